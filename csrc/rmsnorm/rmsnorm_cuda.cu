// SPDX-License-Identifier: Apache-2.0
// CUDA RMSNorm (sm80+). One CTA per row. The row is read from DRAM once: for hidden sizes that fit
// (kItems > 0) it stays in registers between the reduction and the output pass; above that (or for
// rows that cannot take 16-byte vectors) the output pass re-reads the row, which then comes from L2.
// Memory bound: 16-byte loads and stores are what matter, so vectorisation is chosen per call from
// the pointers' alignment, the row strides and the hidden size.
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "rmsnorm/rmsnorm.h"

namespace fastlayers::rmsnorm {
namespace {

using cuda::block_sum;
using cuda::load_f;
using cuda::round_f;
using cuda::store_f;

constexpr int kMaxThreads = 512;
constexpr float kFp8Max = 448.0f;

struct RowPtrs {
  const void* x;
  const void* residual;
  void* residual_out;
};

// Output of one vector of kVec elements: s (the normalised input, already rounded to T), r (rstd).
template <typename T, typename W, int kVec>
__device__ __forceinline__ void write_output(const FwdParams& p, int64_t row, int64_t iv,
                                             const float (&s)[kVec], float r, float scale) {
  float w[kVec], y[kVec];
  load_f<kVec>(static_cast<const W*>(p.weight), iv, w);
  if (p.y_dtype == DType::kFloat8E4M3) {
    cuda::Vec<uint8_t, kVec> q;
    const cuda::ReciprocalDivisor by_scale(scale);  // (here: kept over the row, it cost a spill)
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      q.v[j] = cuda::to_fp8e4m3(by_scale((s[j] * r) * w[j]));  // the correctly rounded y / scale
    }
    reinterpret_cast<cuda::Vec<uint8_t, kVec>*>(static_cast<uint8_t*>(p.y) + row * p.cols)[iv] = q;
    return;
  }
  if (p.weight_offset == 0.0f && !p.round_once) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = round_f<T>(s[j] * r) * w[j];
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = (s[j] * r) * (p.weight_offset + w[j]);
  }
  store_f<kVec>(static_cast<T*>(p.y) + row * p.cols, iv, y);
}

using cuda::nan_max;

template <typename W, int kVec>
__device__ __forceinline__ float abs_max(const FwdParams& p, int64_t iv, const float (&s)[kVec],
                                         float r) {
  float w[kVec], m = 0.0f;
  load_f<kVec>(static_cast<const W*>(p.weight), iv, w);
#pragma unroll
  for (int j = 0; j < kVec; ++j) m = nan_max(m, fabsf((s[j] * r) * w[j]));
  return m;
}

// The row's FP8 scale, max|y| / 448, from each thread's max of |y| (NaN when one of its values was
// NaN): 1 for an all-zero row, and for a row with a NaN (torch's amax is NaN there, as in the
// reference).
__device__ __forceinline__ float fp8_row_scale(float m, float* smem) {
  m = cuda::block_nan_max(m, smem);
  return m > 0.0f ? m / kFp8Max : 1.0f;  // (false for NaN)
}

// Loads vector iv of the row's input s = x (+ residual, rounded to T and stored to residual_out).
template <typename T, int kVec>
__device__ __forceinline__ void load_input(const FwdParams& p, int64_t row, int64_t iv,
                                           float (&s)[kVec]) {
  load_f<kVec>(static_cast<const T*>(p.x) + row * p.x_row_stride, iv, s);
  if (p.residual != nullptr) {
    float res[kVec];
    load_f<kVec>(static_cast<const T*>(p.residual) + row * p.residual_row_stride, iv, res);
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[j] = round_f<T>(s[j] + res[j]);
    store_f<kVec>(static_cast<T*>(p.residual_out) + row * p.cols, iv, s);
  }
}

// kItems > 0: each thread keeps kItems vectors of the row in registers.
// kItems == 0: any hidden size; passes after the first re-read the row (from L2).
template <typename T, typename W, int kVec, int kItems>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(const FwdParams p) {
  __shared__ float smem[32];
  const int64_t nvec = p.cols / kVec;
  const bool fp8 = p.y_dtype == DType::kFloat8E4M3;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    float ss[1] = {0.0f};
    if constexpr (kItems > 0) {
      float s[kItems][kVec];
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        const int64_t iv = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
        if (iv < nvec) {
          load_input<T, kVec>(p, row, iv, s[it]);
#pragma unroll
          for (int j = 0; j < kVec; ++j) ss[0] += s[it][j] * s[it][j];
        }
      }
      block_sum<1>(ss, smem);
      const float r = rsqrtf(ss[0] / static_cast<float>(p.cols) + p.eps);
      float scale = 1.0f;
      if (fp8) {
        float m = 0.0f;
#pragma unroll
        for (int it = 0; it < kItems; ++it) {
          const int64_t iv = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
          if (iv < nvec) m = nan_max(m, abs_max<W, kVec>(p, iv, s[it], r));
        }
        scale = fp8_row_scale(m, smem);
        if (threadIdx.x == 0) p.y_scale[row] = scale;
      }
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        const int64_t iv = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
        if (iv < nvec) write_output<T, W, kVec>(p, row, iv, s[it], r, scale);
      }
    } else {
      for (int64_t iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
        float s[kVec];
        load_input<T, kVec>(p, row, iv, s);
#pragma unroll
        for (int j = 0; j < kVec; ++j) ss[0] += s[j] * s[j];
      }
      block_sum<1>(ss, smem);
      const float r = rsqrtf(ss[0] / static_cast<float>(p.cols) + p.eps);
      // Re-read the rounded sum from residual_out: each thread reads back only what it wrote.
      const T* src = p.residual != nullptr ? static_cast<const T*>(p.residual_out) + row * p.cols
                                           : static_cast<const T*>(p.x) + row * p.x_row_stride;
      float scale = 1.0f;
      if (fp8) {
        float m = 0.0f;
        for (int64_t iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
          float s[kVec];
          load_f<kVec>(src, iv, s);
          m = nan_max(m, abs_max<W, kVec>(p, iv, s, r));
        }
        scale = fp8_row_scale(m, smem);
        if (threadIdx.x == 0) p.y_scale[row] = scale;
      }
      for (int64_t iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
        float s[kVec];
        load_f<kVec>(src, iv, s);
        write_output<T, W, kVec>(p, row, iv, s, r, scale);
      }
    }
  }
}

// dx and this chunk's dw partial for vector iv of one row.
template <typename T, typename W, int kVec>
__device__ __forceinline__ void backward_vec(const BwdParams& p, int64_t row, int64_t iv,
                                             const float (&s)[kVec], const float (&dy)[kVec],
                                             float r, float coef, float (&dw_acc)[kVec]) {
  float w[kVec], dx[kVec];
  load_f<kVec>(static_cast<const W*>(p.weight), iv, w);
  if (p.d_residual_out != nullptr) {
    load_f<kVec>(static_cast<const T*>(p.d_residual_out) + row * p.cols, iv, dx);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dx[j] = 0.0f;
  }
  const bool llama = p.weight_offset == 0.0f && !p.round_once;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    dx[j] += r * (dy[j] * (p.weight_offset + w[j])) - coef * s[j];
    dw_acc[j] += dy[j] * (llama ? round_f<T>(s[j] * r) : s[j] * r);
  }
  store_f<kVec>(static_cast<T*>(p.dx) + row * p.cols, iv, dx);
}

template <typename W, int kVec>
__device__ __forceinline__ void accumulate_sums(const BwdParams& p, int64_t iv,
                                                const float (&s)[kVec], const float (&dy)[kVec],
                                                float (&sums)[2]) {
  float w[kVec];
  load_f<kVec>(static_cast<const W*>(p.weight), iv, w);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    sums[0] += s[j] * s[j];
    sums[1] += (dy[j] * (p.weight_offset + w[j])) * s[j];
  }
}

// Block b owns rows [b*rows/P, (b+1)*rows/P) and writes dw_partial[b]; columns are owned by fixed
// threads, so the accumulation order is fixed: deterministic.
template <typename T, typename W, int kVec, int kItems>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_bwd_kernel(const BwdParams p) {
  __shared__ float smem[64];
  const int64_t nvec = p.cols / kVec;
  const int64_t chunk = blockIdx.x;
  const int64_t row_begin = chunk * p.rows / p.num_partials;
  const int64_t row_end = (chunk + 1) * p.rows / p.num_partials;
  float* partial = p.dw_partial + chunk * p.cols;
  const T* dy_all = static_cast<const T*>(p.dy);
  if constexpr (kItems > 0) {
    using V = cuda::Vec<T, kVec>;
    static_assert(sizeof(V) == sizeof(uint4), "kItems > 0 runs on 16-byte vectors");
    float acc[kItems][kVec] = {};
    for (int64_t row = row_begin; row < row_end; ++row) {
      const auto* x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + row * p.x_row_stride);
      const auto* dy_row = reinterpret_cast<const uint4*>(dy_all + row * p.cols);
      // The row's x and dy stay in registers as loaded, as 32-bit words (16-bit values two to a
      // register: half of what fp32 copies take; with the dw accumulators those spilled 72
      // bytes at 4 items, and so did arrays of 16-bit values), widened where used.
      uint4 xv[kItems], dyv[kItems];
      float sums[2] = {0.0f, 0.0f};
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        const int64_t iv = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
        if (iv < nvec) {
          xv[it] = x[iv];
          dyv[it] = dy_row[iv];
          float s[kVec], dy[kVec];
          cuda::to_f(*reinterpret_cast<const V*>(&xv[it]), s);
          cuda::to_f(*reinterpret_cast<const V*>(&dyv[it]), dy);
          accumulate_sums<W, kVec>(p, iv, s, dy, sums);
        }
      }
      block_sum<2>(sums, smem);
      const float r = rsqrtf(sums[0] / static_cast<float>(p.cols) + p.eps);
      const float coef = r * r * r * sums[1] / static_cast<float>(p.cols);
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        const int64_t iv = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
        if (iv < nvec) {
          float s[kVec], dy[kVec];
          cuda::to_f(*reinterpret_cast<const V*>(&xv[it]), s);
          cuda::to_f(*reinterpret_cast<const V*>(&dyv[it]), dy);
          backward_vec<T, W, kVec>(p, row, iv, s, dy, r, coef, acc[it]);
        }
      }
    }
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int64_t iv = threadIdx.x + static_cast<int64_t>(it) * blockDim.x;
      if (iv < nvec) store_f<kVec>(partial, iv, acc[it]);
    }
  } else {
    // The block's partial row lives in global memory (L2); each column belongs to one thread.
    for (int64_t iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
      const float zero[kVec] = {};
      store_f<kVec>(partial, iv, zero);
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
      float sums[2] = {0.0f, 0.0f};
      for (int64_t iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
        float s[kVec], dy[kVec];
        load_f<kVec>(x, iv, s);
        load_f<kVec>(dy_all + row * p.cols, iv, dy);
        accumulate_sums<W, kVec>(p, iv, s, dy, sums);
      }
      block_sum<2>(sums, smem);
      const float r = rsqrtf(sums[0] / static_cast<float>(p.cols) + p.eps);
      const float coef = r * r * r * sums[1] / static_cast<float>(p.cols);
      for (int64_t iv = threadIdx.x; iv < nvec; iv += blockDim.x) {
        float s[kVec], dy[kVec], acc[kVec];
        load_f<kVec>(x, iv, s);
        load_f<kVec>(dy_all + row * p.cols, iv, dy);
        load_f<kVec>(partial, iv, acc);
        backward_vec<T, W, kVec>(p, row, iv, s, dy, r, coef, acc);
        store_f<kVec>(partial, iv, acc);
      }
    }
  }
}

// dw[j] = sum over chunks of dw_partial[c][j], in chunk order. Consecutive threads, consecutive j.
template <typename W>
__global__ void dw_reduce_kernel(const float* __restrict__ partial,  // [num_partials, cols]
                                 int64_t num_partials, int64_t cols, W* __restrict__ dw) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int64_t c = 0; c < num_partials; ++c) acc += partial[c * cols + j];
    dw[j] = cuda::from_f<W>(acc);
  }
}

int round_up_warp(int64_t n) { return static_cast<int>(((n + 31) / 32) * 32); }

// 16-byte vectors when every pointer, row stride and the hidden size allow them.
template <typename T, typename W>
bool can_vectorize(int64_t cols, std::initializer_list<const void*> t_ptrs,
                   std::initializer_list<int64_t> strides, const void* weight) {
  constexpr int kVec = 16 / sizeof(T);
  if (cols % kVec != 0) return false;
  for (const void* ptr : t_ptrs) {
    if (ptr != nullptr && !cuda::is_aligned(ptr, 16)) return false;
  }
  for (int64_t s : strides) {
    if (s % kVec != 0) return false;
  }
  return cuda::is_aligned(weight, kVec * sizeof(W));
}

// Threads per row for the register-resident variants: at most 128 by default, so that each thread
// keeps several 16-byte vectors of its row in flight. With at most 512 (the policy of the H100 run,
// 928a81e) a 16-bit row of 4096 got one vector per thread, and on the H200 (dd55068) the 16-bit
// forward reached only 0.55-0.61 of the copy bandwidth and FP8 output 0.30-0.36, while fp32 (two
// vectors per thread) reached 0.88-0.94: too few bytes in flight per SM for the faster memory
// (bench/results/h200-run-log.md). FASTLAYERS_RMSNORM_ROW_THREADS=64, 256 or 512 picks another cap
// (read once per process). The 128 cap passed the CUDA RMSNorm tests on that H200; its speed is
// not yet measured on a GPU.
int row_threads_cap() {
  static const int cap = [] {
    const char* env = std::getenv("FASTLAYERS_RMSNORM_ROW_THREADS");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return v == 64 || v == 128 || v == 256 || v == 512 ? v : 128;
  }();
  return cap;
}

// Picks the registers-resident variant with the fewest items per thread that fits in the row
// threads cap, else in kMaxThreads; the looping variant (kItems 0) past that. Only the variants up
// to kMaxItems are instantiated (the 16-bit backward's 8-item kernel, never launched, spilled ~3.6
// KB per thread in ptxas -v and cost compile time).
template <int kMaxItems, typename Launch>
Status launch_by_items(int64_t nvec, Launch&& launch) {
  static_assert(kMaxItems == 1 || kMaxItems == 2 || kMaxItems == 4 || kMaxItems == 8, "items");
  for (const int threads_cap : {row_threads_cap(), kMaxThreads}) {
    for (int items = 1; items <= kMaxItems; items *= 2) {
      if (nvec <= static_cast<int64_t>(threads_cap) * items) {
        const int threads = round_up_warp((nvec + items - 1) / items);
        if (items == 1) return launch(std::integral_constant<int, 1>{}, threads);
        if constexpr (kMaxItems >= 2) {
          if (items == 2) return launch(std::integral_constant<int, 2>{}, threads);
        }
        if constexpr (kMaxItems >= 4) {
          if (items == 4) return launch(std::integral_constant<int, 4>{}, threads);
        }
        if constexpr (kMaxItems >= 8) return launch(std::integral_constant<int, 8>{}, threads);
      }
    }
  }
  return launch(std::integral_constant<int, 0>{}, kMaxThreads);
}

template <typename T, typename W>
Status forward_typed(const FwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const unsigned grid = static_cast<unsigned>(p.rows < (1 << 30) ? p.rows : (1 << 30));
  if (can_vectorize<T, W>(p.cols, {p.x, p.residual, p.y, p.residual_out},
                          {p.x_row_stride, p.residual != nullptr ? p.residual_row_stride : 0},
                          p.weight)) {
    // Register budget: at most 64 cached floats per thread (512 threads x 128 registers).
    constexpr int kMaxItems = 64 / kVec < 8 ? 64 / kVec : 8;
    return launch_by_items<kMaxItems>(p.cols / kVec, [&](auto items, int threads) {
      rms_norm_fwd_kernel<T, W, kVec, decltype(items)::value><<<grid, threads, 0, stream>>>(p);
      return cuda::last_launch_status();
    });
  }
  rms_norm_fwd_kernel<T, W, 1, 0><<<grid, round_up_warp(p.cols < kMaxThreads ? p.cols : kMaxThreads), 0, stream>>>(p);
  return cuda::last_launch_status();
}

template <typename T, typename W>
Status backward_typed(const BwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const unsigned grid = static_cast<unsigned>(p.num_partials);
  Status status;
  // The fp32 dw partials are accessed kVec at a time too (alignment kVec * 4 bytes).
  if (can_vectorize<T, W>(p.cols, {p.x, p.dy, p.dx, p.d_residual_out}, {p.x_row_stride}, p.weight) &&
      cuda::is_aligned(p.dw_partial, kVec * sizeof(float))) {
    // s, dy and the dw accumulator are all cached: 32 floats each at most.
    constexpr int kMaxItems = 32 / kVec < 4 ? 32 / kVec : 4;
    status = launch_by_items<kMaxItems>(p.cols / kVec, [&](auto items, int threads) {
      rms_norm_bwd_kernel<T, W, kVec, decltype(items)::value><<<grid, threads, 0, stream>>>(p);
      return cuda::last_launch_status();
    });
  } else {
    rms_norm_bwd_kernel<T, W, 1, 0><<<grid, round_up_warp(p.cols < kMaxThreads ? p.cols : kMaxThreads), 0, stream>>>(p);
    status = cuda::last_launch_status();
  }
  if (!status.is_ok()) return status;
  constexpr int kReduceThreads = 256;
  const int64_t blocks = (p.cols + kReduceThreads - 1) / kReduceThreads;
  dw_reduce_kernel<W><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kReduceThreads, 0, stream>>>(
      p.dw_partial, p.num_partials, p.cols, static_cast<W*>(p.dw));
  return cuda::last_launch_status();
}

template <template <typename, typename> class Op, typename P>
Status dispatch(const P& p, cudaStream_t stream) {
  const bool w32 = p.weight_dtype == DType::kFloat32;
  switch (p.x_dtype) {
    case DType::kFloat32:
      return Op<float, float>::run(p, stream);
    case DType::kFloat16:
      return w32 ? Op<__half, float>::run(p, stream) : Op<__half, __half>::run(p, stream);
    case DType::kBFloat16:
      return w32 ? Op<__nv_bfloat16, float>::run(p, stream)
                 : Op<__nv_bfloat16, __nv_bfloat16>::run(p, stream);
    default:
      return Status::invalid("rms_norm: x must be float32, float16 or bfloat16");
  }
}

template <typename T, typename W>
struct Forward {
  static Status run(const FwdParams& p, cudaStream_t s) { return forward_typed<T, W>(p, s); }
};
template <typename T, typename W>
struct Backward {
  static Status run(const BwdParams& p, cudaStream_t s) { return backward_typed<T, W>(p, s); }
};

}  // namespace

Status forward_cuda(const FwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.rows == 0) return Status::ok();
  return dispatch<Forward>(p, static_cast<cudaStream_t>(stream));
}

Status backward_cuda(const BwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  return dispatch<Backward>(p, static_cast<cudaStream_t>(stream));
}

}  // namespace fastlayers::rmsnorm
