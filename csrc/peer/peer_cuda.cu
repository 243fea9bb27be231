// SPDX-License-Identifier: Apache-2.0
// CUDA PEER expert kernels (sm80+). First versions, written for correctness and coalescing; their
// tests passed on an H200 (dd55068), where the forward ran at 0.27 of the copy bandwidth.
// Semantics: peer.h and python/fastlayers/reference/peer.py.
//   Forward, one CTA per token: x in shared memory; each warp takes pairs p = warp, warp + 8, ...
//     and reduces down[e] . x (lane-strided, coalesced); then every thread owns output columns and
//     sums gate * act(s) * up[e][j] over the pairs (each row read once, coalesced across threads;
//     eight rows' loads in flight per thread since the H200 run, not yet measured).
//   Backward, one CTA per token for dx, dgates and the per-pair coefficient (the same two phases
//     with dy and up, then down), then one CTA per selected expert summing its pairs in token order
//     (deterministic, no atomics). Dense tables are zeroed with cudaMemsetAsync first.
// Shared memory per CTA: dim + pairs floats and pairs row offsets (checked by the launchers).
#include "common/cuda_utils.cuh"
#include "fff/activation.h"
#include "peer/peer.h"

namespace fastlayers::peer {
namespace {

using cuda::from_f;
using cuda::to_f;
using cuda::warp_dot;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

size_t token_smem(int64_t dim, int64_t pairs) {
  return static_cast<size_t>(pairs) * sizeof(int64_t) +
         static_cast<size_t>(dim + pairs) * sizeof(float);
}

// Shared layout: rows [pairs] int64, then row [dim] fp32, then coef [pairs] fp32.
struct TokenSmem {
  int64_t* rows;
  float* row;
  float* coef;
  __device__ TokenSmem(unsigned char* base, int64_t dim, int64_t pairs)
      : rows(reinterpret_cast<int64_t*>(base)),
        row(reinterpret_cast<float*>(base + pairs * sizeof(int64_t))),
        coef(row + dim) {}
};

template <typename T>
__device__ void load_row(float* dst, const T* src, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = to_f(src[i]);
}

// out[j] = sum_p coef[p] * table[rows[p] * dim + j], for this thread's columns, in pair order.
// Eight rows' loads are issued before their products are summed (in the same order, so the same
// bits as one pair at a time): each load is a different row from DRAM, and one at a time left the
// thread waiting on each.
template <typename T>
__device__ void gather_sum(T* out, const T* table, const TokenSmem& s, int64_t dim, int64_t pairs) {
  constexpr int kAhead = 8;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    float acc = 0.0f;
    int64_t q = 0;
    for (; q + kAhead <= pairs; q += kAhead) {
      float v[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) v[u] = to_f(table[s.rows[q + u] + j]);
#pragma unroll
      for (int u = 0; u < kAhead; ++u) acc += s.coef[q + u] * v[u];
    }
    for (; q < pairs; ++q) acc += s.coef[q] * to_f(table[s.rows[q] + j]);
    out[j] = from_f<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) experts_forward_kernel(const ExpertsFwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const TokenSmem s(smem, p.dim, p.pairs);
  const int64_t t = blockIdx.x, P = p.pairs;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* down = static_cast<const T*>(p.down);
  const T* gates = static_cast<const T*>(p.gates) + t * P;
  load_row(s.row, static_cast<const T*>(p.x) + t * p.x_row_stride, p.dim);
  __syncthreads();
  for (int64_t q = warp; q < P; q += kWarps) {
    const int64_t e = p.indices[t * P + q];
    const float acc = warp_dot(s.row, down + e * p.dim, p.dim);
    if (lane == 0) {
      p.preact[t * P + q] = acc;
      s.coef[q] = to_f(gates[q]) * fff::act_value(p.act, acc);
      s.rows[q] = e * p.dim;
    }
  }
  __syncthreads();
  gather_sum(static_cast<T*>(p.y) + t * p.dim, static_cast<const T*>(p.up), s, p.dim, P);
}

// c = dy . up[e]; dgate = act(s) c; coef = act'(s) gate c; dx = sum coef down[e].
template <typename T>
__global__ void __launch_bounds__(kThreads) experts_backward_token_kernel(const ExpertsBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const TokenSmem s(smem, p.dim, p.pairs);
  const int64_t t = blockIdx.x, P = p.pairs;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* up = static_cast<const T*>(p.up);
  const T* gates = static_cast<const T*>(p.gates) + t * P;
  load_row(s.row, static_cast<const T*>(p.dy) + t * p.dim, p.dim);
  __syncthreads();
  for (int64_t q = warp; q < P; q += kWarps) {
    const int64_t e = p.indices[t * P + q];
    const float c = warp_dot(s.row, up + e * p.dim, p.dim);
    if (lane == 0) {
      const float pre = p.preact[t * P + q];
      static_cast<T*>(p.dgates)[t * P + q] = from_f<T>(fff::act_value(p.act, pre) * c);
      const float coef = fff::act_grad(p.act, pre) * to_f(gates[q]) * c;
      p.coef[t * P + q] = coef;
      s.coef[q] = coef;
      s.rows[q] = e * p.dim;
    }
  }
  __syncthreads();
  gather_sum(static_cast<T*>(p.dx) + t * p.dim, static_cast<const T*>(p.down), s, p.dim, P);
}

// Per selected expert u (its pairs order[seg[u], seg[u+1]), token order): ddown row = sum coef x_t,
// dup row = sum act(s) gate dy_t; row u of the compact outputs or row ids[u] of the dense tables.
template <typename T>
__global__ void __launch_bounds__(kThreads) experts_backward_expert_kernel(const ExpertsBwdParams p) {
  const int64_t u = blockIdx.x, P = p.pairs;
  const int64_t begin = p.seg_offsets[u], end = p.seg_offsets[u + 1];
  const int64_t row = p.dense ? p.ids[u] : u;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* gates = static_cast<const T*>(p.gates);
  T* ddown = static_cast<T*>(p.ddown_rows) + row * p.dim;
  T* dup = static_cast<T*>(p.dup_rows) + row * p.dim;
  for (int64_t j = threadIdx.x; j < p.dim; j += blockDim.x) {
    float a_down = 0.0f, a_up = 0.0f;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t pair = p.order[k], t = pair / P;
      a_down += p.coef[pair] * to_f(x[t * p.x_row_stride + j]);
      a_up += fff::act_value(p.act, p.preact[pair]) * to_f(gates[pair]) * to_f(dy[t * p.dim + j]);
    }
    ddown[j] = from_f<T>(a_down);
    dup[j] = from_f<T>(a_up);
  }
}

template <typename T>
Status forward_typed(const ExpertsFwdParams& p, cudaStream_t stream) {
  experts_forward_kernel<T><<<static_cast<unsigned>(p.tokens), kThreads, token_smem(p.dim, p.pairs),
                              stream>>>(p);
  return cuda::last_launch_status();
}

template <typename T>
Status backward_typed(const ExpertsBwdParams& p, cudaStream_t stream) {
  if (p.dense) {
    const size_t bytes = static_cast<size_t>(p.num_experts * p.dim) * sizeof(T);
    if (cudaMemsetAsync(p.ddown_rows, 0, bytes, stream) != cudaSuccess ||
        cudaMemsetAsync(p.dup_rows, 0, bytes, stream) != cudaSuccess) {
      return cuda::last_launch_status();
    }
  }
  experts_backward_token_kernel<T><<<static_cast<unsigned>(p.tokens), kThreads,
                                     token_smem(p.dim, p.pairs), stream>>>(p);
  if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  if (p.unique == 0) return Status::ok();
  experts_backward_expert_kernel<T><<<static_cast<unsigned>(p.unique), kThreads, 0, stream>>>(p);
  return cuda::last_launch_status();
}

template <typename P>
Status check_cuda_sizes(const P& p) {
  if (!experts_cuda_supported(p.tokens, p.dim, p.pairs)) {
    return Status::unsupported(
        "peer_experts: the CUDA kernels need (dim + 3 * pairs) * 4 bytes <= 48 KiB of shared memory "
        "and tokens < 2^31");
  }
  return Status::ok();
}

}  // namespace

bool experts_cuda_supported(int64_t tokens, int64_t dim, int64_t pairs) {
  return token_smem(dim, pairs) <= kExpertsCudaSmemBytes && tokens < (int64_t{1} << 31);
}

Status experts_forward_cuda(const ExpertsFwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (Status s = check_cuda_sizes(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  const auto st = static_cast<cudaStream_t>(stream);
  FL_CUDA_BY_FLOAT_DTYPE(forward_typed, p, st, "peer_experts: dtype must be float32, float16 or bfloat16")
}

Status experts_backward_cuda(const ExpertsBwdParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (Status s = check_cuda_sizes(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();  // (the Python layer returns zero tables itself)
  const auto st = static_cast<cudaStream_t>(stream);
  FL_CUDA_BY_FLOAT_DTYPE(backward_typed, p, st,
                         "peer_experts_backward: dtype must be float32, float16 or bfloat16")
}

}  // namespace fastlayers::peer
