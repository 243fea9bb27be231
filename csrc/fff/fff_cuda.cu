// SPDX-License-Identifier: Apache-2.0
// CUDA FFF kernels (sm80+): one warp per token for the descent and the token's outputs, one CTA per
// node for the weight gradients. First versions, written for correctness: coalesced lane-strided
// loads, warp-shuffle dot products, fp32 accumulation, no atomics (deterministic). They passed their
// tests on an H200 (dd55068), where a single token took 80-120 us: latency-bound, each lane waiting
// on its loads one at a time; the dot products and row sums now keep several loads in flight (not
// yet measured on a GPU). The faster strategies (16-byte loads, the shared top levels as a
// tensor-core GEMM, leaf-grouped GEMMs for large batches) are still to come.
#include "common/cuda_utils.cuh"
#include "fff/activation.h"
#include "fff/fff.h"

namespace fastlayers::fff {
namespace {

using cuda::from_f;
using cuda::to_f;
using cuda::warp_dot;
using cuda::warp_sum;

constexpr int kWarps = 4;  // tokens per CTA
constexpr int kMaxLevels = 31;

// out[j] = sum_l coef[l] * base[row[l] + j] for j < n, by one warp (the rows of a token's path):
// each lane takes kCols columns at a time and the levels are unrolled, so that a lane has up to
// 4 kCols independent loads in flight (one column at a time waited on memory load by load). The
// sum over levels runs in level order, as before.
template <typename T>
__device__ __forceinline__ void warp_combine_rows(const T* base, const int64_t* row,
                                                  const float* coef, int64_t levels, int64_t n,
                                                  T* out) {
  constexpr int kCols = 4;
  for (int64_t j0 = threadIdx.x & 31; j0 < n; j0 += 32 * kCols) {
    float acc[kCols] = {};
#pragma unroll 4
    for (int64_t l = 0; l < levels; ++l) {
      const T* r = base + row[l];
      const float c = coef[l];
#pragma unroll
      for (int u = 0; u < kCols; ++u) {
        if (j0 + 32 * u < n) acc[u] += c * to_f(r[j0 + 32 * u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kCols; ++u) {
      if (j0 + 32 * u < n) out[j0 + 32 * u] = from_f<T>(acc[u]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarps) ultra_forward_kernel(const UltraFwdParams p) {
  __shared__ float s_coef[kWarps][kMaxLevels];
  __shared__ int64_t s_row[kWarps][kMaxLevels];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.tokens) return;  // whole warps exit: no block-wide barrier follows
  const T* x = static_cast<const T*>(p.x) + t * p.x_row_stride;
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* w_out = static_cast<const T*>(p.w_out);
  int64_t node = 0;
  for (int64_t l = 0; l < p.levels; ++l) {
    float a = warp_dot(x, w_in + node * p.in_features, p.in_features);
    if (p.b_in != nullptr) a += to_f(static_cast<const T*>(p.b_in)[node]);
    if (lane == 0) {
      if (p.path != nullptr) {  // kept for the backward; inference passes null
        p.path[t * p.levels + l] = static_cast<int32_t>(node);
        p.preact[t * p.levels + l] = a;
      }
      s_coef[warp][l] = act_value(p.act, a);
      s_row[warp][l] = node * p.out_features;
    }
    node = 2 * node + 1 + (a > 0.0f ? 1 : 0);
  }
  __syncwarp();
  warp_combine_rows(w_out, s_row[warp], s_coef[warp], p.levels, p.out_features,
                    static_cast<T*>(p.y) + t * p.out_features);
}

// coef = act'(a) (dy . w_out[n]) per (token, level); dx = sum_l coef_l w_in[n_l].
template <typename T>
__global__ void __launch_bounds__(32 * kWarps) ultra_backward_token_kernel(const UltraBwdParams p) {
  __shared__ float s_coef[kWarps][kMaxLevels];
  __shared__ int64_t s_row[kWarps][kMaxLevels];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.tokens) return;
  const T* dy = static_cast<const T*>(p.dy) + t * p.out_features;
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* w_out = static_cast<const T*>(p.w_out);
  for (int64_t l = 0; l < p.levels; ++l) {
    const int64_t node = p.path[t * p.levels + l];
    const float c = warp_dot(dy, w_out + node * p.out_features, p.out_features);
    if (lane == 0) {
      const float g = act_grad(p.act, p.preact[t * p.levels + l]) * c;
      p.coef[t * p.levels + l] = g;
      s_coef[warp][l] = g;
      s_row[warp][l] = node * p.in_features;
    }
  }
  __syncwarp();
  warp_combine_rows(w_in, s_row[warp], s_coef[warp], p.levels, p.in_features,
                    static_cast<T*>(p.dx) + t * p.in_features);
}

// One CTA per node: its pairs in the fixed (node-sorted, token) order; threads own columns.
template <typename T>
__global__ void ultra_backward_node_kernel(const UltraBwdParams p) {
  const int64_t node = blockIdx.x;
  const int64_t begin = p.offsets[node], end = p.offsets[node + 1];
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dw_in = static_cast<T*>(p.dw_in) + node * p.in_features;
  T* dw_out = static_cast<T*>(p.dw_out) + node * p.out_features;
  for (int64_t j = threadIdx.x; j < p.in_features; j += blockDim.x) {
    float acc = 0.0f;
    for (int64_t q = begin; q < end; ++q) {
      const int64_t pair = p.order[q];
      acc += p.coef[pair] * to_f(x[(pair / p.levels) * p.x_row_stride + j]);
    }
    dw_in[j] = from_f<T>(acc);
  }
  for (int64_t j = threadIdx.x; j < p.out_features; j += blockDim.x) {
    float acc = 0.0f;
    for (int64_t q = begin; q < end; ++q) {
      const int64_t pair = p.order[q];
      acc += act_value(p.act, p.preact[pair]) * to_f(dy[(pair / p.levels) * p.out_features + j]);
    }
    dw_out[j] = from_f<T>(acc);
  }
  if (p.db_in != nullptr && threadIdx.x == 0) {
    float acc = 0.0f;
    for (int64_t q = begin; q < end; ++q) acc += p.coef[p.order[q]];
    static_cast<T*>(p.db_in)[node] = from_f<T>(acc);
  }
}

// Hard descent, then the leaf: h (leaf hidden units) in dynamic shared memory, width floats per warp.
template <typename T>
__global__ void __launch_bounds__(32 * kWarps) hard_forward_kernel(const HardFwdParams p) {
  extern __shared__ float s_h[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.tokens) return;
  float* h = s_h + warp * p.width;
  const T* x = static_cast<const T*>(p.x) + t * p.x_row_stride;
  int64_t node = 0;
  for (int64_t d = 0; d < p.depth; ++d) {
    const float logit = warp_dot(x, static_cast<const T*>(p.node_w) + node * p.in_features,
                                 p.in_features) +
                        to_f(static_cast<const T*>(p.node_b)[node]);
    node = 2 * node + 1 + (logit > 0.0f ? 1 : 0);
  }
  const int64_t leaf = node - ((int64_t{1} << p.depth) - 1);
  if (lane == 0 && p.leaf != nullptr) p.leaf[t] = static_cast<int32_t>(leaf);
  if (p.descent_only) return;
  const T* w1 = static_cast<const T*>(p.w1) + leaf * p.in_features * p.width;
  const T* b1 = static_cast<const T*>(p.b1) + leaf * p.width;
  for (int64_t k = lane; k < p.width; k += 32) {
    float acc = to_f(b1[k]);
#pragma unroll 8
    for (int64_t i = 0; i < p.in_features; ++i) acc += to_f(x[i]) * to_f(w1[i * p.width + k]);
    h[k] = act_value(p.act, acc);
  }
  __syncwarp();
  const T* w2 = static_cast<const T*>(p.w2) + leaf * p.width * p.out_features;
  const T* b2 = static_cast<const T*>(p.b2) + leaf * p.out_features;
  T* y = static_cast<T*>(p.y) + t * p.out_features;
  for (int64_t o = lane; o < p.out_features; o += 32) {
    float acc = to_f(b2[o]);
#pragma unroll 8
    for (int64_t k = 0; k < p.width; ++k) acc += h[k] * to_f(w2[k * p.out_features + o]);
    y[o] = from_f<T>(acc);
  }
}

unsigned token_blocks(int64_t tokens) { return static_cast<unsigned>((tokens + kWarps - 1) / kWarps); }

template <typename T>
Status ultra_forward_typed(const UltraFwdParams& p, cudaStream_t stream) {
  ultra_forward_kernel<T><<<token_blocks(p.tokens), 32 * kWarps, 0, stream>>>(p);
  return cuda::last_launch_status();
}

template <typename T>
Status ultra_backward_typed(const UltraBwdParams& p, cudaStream_t stream) {
  if (p.tokens > 0) {
    ultra_backward_token_kernel<T><<<token_blocks(p.tokens), 32 * kWarps, 0, stream>>>(p);
    if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  }
  const int64_t nodes = (int64_t{1} << p.levels) - 1;
  ultra_backward_node_kernel<T><<<static_cast<unsigned>(nodes), 256, 0, stream>>>(p);
  return cuda::last_launch_status();
}

template <typename T>
Status hard_forward_typed(const HardFwdParams& p, cudaStream_t stream) {
  const size_t smem =
      p.descent_only ? 0 : static_cast<size_t>(kWarps) * static_cast<size_t>(p.width) * sizeof(float);
  hard_forward_kernel<T><<<token_blocks(p.tokens), 32 * kWarps, smem, stream>>>(p);
  return cuda::last_launch_status();
}

template <template <typename> class Op, typename P>
Status by_dtype(const P& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32:
      return Op<float>::run(p, stream);
    case DType::kFloat16:
      return Op<__half>::run(p, stream);
    case DType::kBFloat16:
      return Op<__nv_bfloat16>::run(p, stream);
    default:
      return Status::invalid("fff: dtype must be float32, float16 or bfloat16");
  }
}

template <typename T>
struct UltraForward {
  static Status run(const UltraFwdParams& p, cudaStream_t s) { return ultra_forward_typed<T>(p, s); }
};
template <typename T>
struct UltraBackward {
  static Status run(const UltraBwdParams& p, cudaStream_t s) { return ultra_backward_typed<T>(p, s); }
};
template <typename T>
struct HardForward {
  static Status run(const HardFwdParams& p, cudaStream_t s) { return hard_forward_typed<T>(p, s); }
};

}  // namespace

// Largest leaf width hard_forward_cuda takes: kWarps rows of h in the default 48 KiB of shared memory.
constexpr int64_t kMaxCudaLeafWidth = 48 * 1024 / (kWarps * 4);

Status ultra_forward_cuda(const UltraFwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  return by_dtype<UltraForward>(p, static_cast<cudaStream_t>(stream));
}

Status ultra_backward_cuda(const UltraBwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  return by_dtype<UltraBackward>(p, static_cast<cudaStream_t>(stream));
}

Status hard_forward_cuda(const HardFwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (!p.descent_only && p.width > kMaxCudaLeafWidth) {
    return Status::unsupported("fff_hard: CUDA kernel takes leaf_width <= 3072");
  }
  if (p.tokens == 0) return Status::ok();
  return by_dtype<HardForward>(p, static_cast<cudaStream_t>(stream));
}

}  // namespace fastlayers::fff
