// SPDX-License-Identifier: Apache-2.0
// CUDA INT4 x FP8 fallback kernels (sm80+), written for correctness first; their tests passed on an
// H200 (dd55068); the 16-byte GEMV (gemv16_kernel) was added after, not yet run on a GPU. Semantics: int4_fp8.h and python/fastlayers/reference/int4_fp8.py. The Hopper
// CUTLASS path (LUT mainloop) is separate (sm90/); these run on every architecture and any shape.
//   GEMM (meant for decode, m <= 8 per CTA row block): one warp per output channel, lanes stride
//     the packed weight row (16 bytes = 32 weights per load, two in flight, when rows and the
//     activations are 16-byte aligned and k is a multiple of 32; else 4 or 1), table values
//     fp8(q * s8) from a shared-memory table per scale code (built once per CTA), up to 8 rows of
//     activations per CTA, warp-sum, fused epilogue xs * c * acc + bias.
//   Dequantise: fp8(q * s8) as FP8 codes [n, k], for "dequantize + matmul" at larger m.
//   Quantise: one CTA per row, dynamic per-row FP8 (NaN rows get scale 1, as the reference).
#include "common/cuda_utils.cuh"
#include "int4_fp8/int4_fp8.h"

namespace fastlayers::int4_fp8 {
namespace {

using cuda::from_f;
using cuda::to_f;

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;  // output channels per CTA
constexpr int kGemvRows = 8;                   // activation rows per CTA

__device__ __forceinline__ float fp8_value(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

__device__ __forceinline__ float add_bias(const GemmParams& p, float y, int64_t col) {
  if (p.bias == nullptr) return y;
  switch (p.bias_dtype) {
    case DType::kFloat16:
      return y + to_f(static_cast<const __half*>(p.bias)[col]);
    case DType::kBFloat16:
      return y + to_f(static_cast<const __nv_bfloat16*>(p.bias)[col]);
    default:
      return y + static_cast<const float*>(p.bias)[col];
  }
}

// The CTA's tables: lut[code][nibble] = fp8(q * s8) (the weight values of a scale code) and
// f8[code] (the activations' FP8 values).
__device__ __forceinline__ void build_tables(float (&lut)[256][16], float (&f8)[256]) {
  for (int i = threadIdx.x; i < 256 * 16; i += blockDim.x) {
    const int code = i >> 4, idx = i & 15;
    const float q = static_cast<float>(idx < 8 ? idx : idx - 16);
    lut[code][idx] = fp8_value(cuda::to_fp8e4m3(q * fp8_value(static_cast<uint8_t>(code))));
  }
  for (int i = threadIdx.x; i < 256; i += blockDim.x) f8[i] = fp8_value(static_cast<uint8_t>(i));
}

// The warp's sums to the outputs of column col, rows row0 .. row0 + rows - 1 (lane 0 writes).
template <typename Out>
__device__ __forceinline__ void write_column(const GemmParams& p, float (&acc)[kGemvRows], int rows, int64_t row0,
                                             int64_t col) {
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) acc[r] = cuda::warp_sum(acc[r]);
  if ((threadIdx.x & 31) == 0) {
    Out* y = static_cast<Out*>(p.y);
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {  // (unrolled: acc stays in registers)
      if (r < rows) {
        const float v = acc[r] * p.xs[row0 + r] * p.channel_scale[col];
        y[(row0 + r) * p.n + col] = from_f<Out>(add_bias(p, v, col));
      }
    }
  }
}

// A GEMV warp's task: output column col (one per warp), activation rows row0 .. row0 + rows - 1
// (one block of kGemvRows per blockIdx.y), and where its scale codes and activations start.
struct GemvTask {
  int64_t col, row0;
  int rows;
  const uint8_t* s;  // the column's group-scale codes
  const uint8_t* x;  // the first row's FP8 activations
  __device__ explicit GemvTask(const GemmParams& p)
      : col(static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)),
        row0(static_cast<int64_t>(blockIdx.y) * kGemvRows),
        rows(p.m - row0 < kGemvRows ? static_cast<int>(p.m - row0) : kGemvRows),
        s(&p.group_scale[col * ((p.k + p.group_size - 1) / p.group_size)].bits),
        x(&p.xq[row0 * p.x_row_stride].bits) {}
};

template <typename Out, bool kWords>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const GemmParams p) {
  __shared__ float lut[256][16];  // [scale code][nibble code]
  __shared__ float f8[256];
  build_tables(lut, f8);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const GemvTask task(p);
  if (task.col >= p.n) return;
  const int64_t col = task.col, row0 = task.row0;
  const int rows = task.rows;
  const uint8_t* w = p.qweight + col * (p.k / 2);
  const uint8_t* s = task.s;
  const uint8_t* x = task.x;

  float acc[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) acc[r] = 0.0f;
  // One weight byte: k = 2b (low nibble) and 2b + 1 (high nibble), both in group 2b / g (g even).
  auto byte_step = [&](int64_t b, uint32_t byte) {
    const float* l = lut[s[(2 * b) / p.group_size]];
    const float w0 = l[byte & 15u], w1 = l[(byte >> 4) & 15u];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      if (r < rows) {
        const uint8_t* xr = x + r * p.x_row_stride + 2 * b;
        acc[r] += f8[__ldg(xr)] * w0 + f8[__ldg(xr + 1)] * w1;
      }
    }
  };
  const int64_t bytes = p.k / 2;
  if (kWords) {  // rows of whole, 4-byte aligned words: one 32-bit load per 8 weights
    const uint32_t* w4 = reinterpret_cast<const uint32_t*>(w);
    for (int64_t i = lane; i < bytes / 4; i += 32) {
      const uint32_t word = __ldg(w4 + i);
#pragma unroll
      for (int t = 0; t < 4; ++t) byte_step(4 * i + t, (word >> (8 * t)) & 0xFFu);
    }
  } else {
    for (int64_t b = lane; b < bytes; b += 32) byte_step(b, __ldg(w + b));
  }
  write_column<Out>(p, acc, rows, row0, col);
}

// The aligned case (k a multiple of 32; weight rows, activation rows and their stride 16-byte
// aligned): lane l takes the 16-byte weight chunks c = l, l + 32, ... (weights 32c .. 32c + 31),
// two chunks' loads in flight; a chunk's 32 weight values come from the table once (one scale code
// per chunk when the group size is a multiple of 32), then each activation row's 32 FP8 values in
// two 16-byte loads. (The general kernel above loads 4 weight bytes and one activation byte at a
// time, with a 64-bit division per weight byte for its scale code.)
template <typename Out>
__global__ void __launch_bounds__(kGemvThreads) gemv16_kernel(const GemmParams p) {
  __shared__ float lut[256][16];  // [scale code][nibble code]
  __shared__ float f8[256];
  build_tables(lut, f8);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const GemvTask task(p);
  if (task.col >= p.n) return;
  const int64_t col = task.col, row0 = task.row0, chunks = p.k / 32;
  const int rows = task.rows;
  const uint4* w = reinterpret_cast<const uint4*>(p.qweight + col * (p.k / 2));
  const uint8_t* s = task.s;
  const uint8_t* x = task.x;
  const bool chunk_in_one_group = p.group_size % 32 == 0;

  float acc[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) acc[r] = 0.0f;
  constexpr int kAhead = 2;
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kAhead) {
    uint4 wv[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (c0 + 32 * u < chunks) wv[u] = __ldg(w + c0 + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
      const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      float wf[32];
      const float* l = lut[s[32 * c / p.group_size]];
#pragma unroll
      for (int i = 0; i < 16; ++i) {  // byte i: weights 32c + 2i (low nibble) and + 1
        if (!chunk_in_one_group) l = lut[s[(32 * c + 2 * i) / p.group_size]];
        const uint32_t byte = (words[i >> 2] >> (8 * (i & 3))) & 0xFFu;
        wf[2 * i] = l[byte & 15u];
        wf[2 * i + 1] = l[byte >> 4];
      }
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        if (r < rows) {
          const uint4* xr = reinterpret_cast<const uint4*>(x + r * p.x_row_stride + 32 * c);
          const uint4 xa = __ldg(xr), xb = __ldg(xr + 1);
          const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
          for (int i = 0; i < 32; i += 2) {  // (pairs, as the general kernel sums them)
            const uint32_t x0 = (xw[i >> 2] >> (8 * (i & 3))) & 0xFFu;
            const uint32_t x1 = (xw[i >> 2] >> (8 * ((i & 3) + 1))) & 0xFFu;
            acc[r] += f8[x0] * wf[i] + f8[x1] * wf[i + 1];
          }
        }
      }
    }
  }
  write_column<Out>(p, acc, rows, row0, col);
}

template <typename Out>
Status launch_gemv(const GemmParams& p, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((p.n + kGemvWarps - 1) / kGemvWarps),
                  static_cast<unsigned>((p.m + kGemvRows - 1) / kGemvRows));
  const bool words = (p.k / 2) % 4 == 0 && cuda::is_aligned(p.qweight, 4);
  if (p.k % 32 == 0 && cuda::is_aligned(p.qweight, 16) && cuda::is_aligned(p.xq, 16) && p.x_row_stride % 16 == 0) {
    gemv16_kernel<Out><<<grid, kGemvThreads, 0, st>>>(p);
  } else if (words) {
    gemv_kernel<Out, true><<<grid, kGemvThreads, 0, st>>>(p);
  } else {
    gemv_kernel<Out, false><<<grid, kGemvThreads, 0, st>>>(p);
  }
  return cuda::last_launch_status();
}

__global__ void dequant_kernel(const uint8_t* qweight, const uint8_t* group_scale, uint8_t* out,
                               int64_t n, int64_t k, int64_t group_size) {
  const int64_t bytes = n * (k / 2), groups = (k + group_size - 1) / group_size;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / (k / 2), b = i % (k / 2);
    const float s8 = fp8_value(group_scale[row * groups + (2 * b) / group_size]);
    const uint32_t byte = qweight[i];
    const int q0 = static_cast<int>(byte & 15u), q1 = static_cast<int>(byte >> 4);
    out[row * k + 2 * b] = cuda::to_fp8e4m3(static_cast<float>(q0 < 8 ? q0 : q0 - 16) * s8);
    out[row * k + 2 * b + 1] = cuda::to_fp8e4m3(static_cast<float>(q1 < 8 ? q1 : q1 - 16) * s8);
  }
}

constexpr int kQuantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(const QuantizeParams p) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) amax = cuda::nan_max(amax, fabsf(to_f(x[i])));
  amax = cuda::block_nan_max(amax, red);
  const float scale = amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;  // (1 for a zero row, or a NaN)
  if (threadIdx.x == 0) p.xs[row] = scale;
  uint8_t* out = &p.xq[row * p.cols].bits;
  const cuda::ReciprocalDivisor by_scale(scale);  // the correctly rounded x / scale
  for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) out[i] = cuda::to_fp8e4m3(by_scale(to_f(x[i])));
}

}  // namespace

Status gemm_cuda(const GemmParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.m == 0) return Status::ok();
  if ((p.m + kGemvRows - 1) / kGemvRows > 65535) {
    return Status::invalid("int4_fp8_gemm: too many rows for the CUDA GEMV (use dequantize + matmul)");
  }
  const auto st = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case DType::kFloat32:
      return launch_gemv<float>(p, st);
    case DType::kFloat16:
      return launch_gemv<__half>(p, st);
    default:
      return launch_gemv<__nv_bfloat16>(p, st);
  }
}

Status dequantize_cuda(const DequantParams& p, void* stream) {
  if (p.n <= 0 || p.k <= 0 || p.k % 2 || p.group_size <= 0 || p.group_size % 2) {
    return Status::invalid("int4_fp8_dequantize: need n > 0, an even k > 0 and an even group_size");
  }
  if (p.qweight == nullptr || p.group_scale == nullptr || p.out == nullptr) {
    return Status::invalid("int4_fp8_dequantize: null pointer argument");
  }
  const int64_t bytes = p.n * (p.k / 2);
  const int blocks = static_cast<int>((bytes + 255) / 256 < 65535 ? (bytes + 255) / 256 : 65535);
  dequant_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      p.qweight, &p.group_scale->bits, &p.out->bits, p.n, p.k, p.group_size);
  return cuda::last_launch_status();
}

Status quantize_cuda(const QuantizeParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.rows == 0) return Status::ok();
  const auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(p.rows);
  switch (p.dtype) {
    case DType::kFloat32:
      quantize_kernel<float><<<grid, kQuantThreads, 0, st>>>(p);
      break;
    case DType::kFloat16:
      quantize_kernel<__half><<<grid, kQuantThreads, 0, st>>>(p);
      break;
    default:
      quantize_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, st>>>(p);
  }
  return cuda::last_launch_status();
}

}  // namespace fastlayers::int4_fp8
