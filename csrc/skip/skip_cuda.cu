// SPDX-License-Identifier: Apache-2.0
// CUDA routed-row kernels (sm80+): gather_rows, scatter_add_gated and its fused backward. First
// versions; their tests passed on an H200 (dd55068). Semantics and rounding: skip.h (RowsParams),
// bit-exact with the CPU kernels (the scatter's product is exact in double). One CTA per routed row,
// threads over the row. Indices outside [0, n) are skipped (the CPU launcher reports them; checking
// here would need a host synchronisation).
#include "common/cuda_utils.cuh"
#include "skip/skip.h"

namespace fastlayers::skip {
namespace {

using cuda::from_f;
using cuda::to_f;

constexpr int kThreads = 128;

template <typename T>
__global__ void gather_kernel(const RowsParams p) {
  const int64_t i = blockIdx.x, r = p.idx[i];
  const bool valid = r >= 0 && r < p.n;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y) + i * p.dim;
  for (int64_t j = threadIdx.x; j < p.dim; j += blockDim.x) y[j] = valid ? x[r * p.dim + j] : from_f<T>(0.0f);
}

template <typename T>
__global__ void scatter_kernel(const RowsParams p) {
  const int64_t i = blockIdx.x, r = p.idx[i];
  if (r < 0 || r >= p.n) return;
  const T* res = static_cast<const T*>(p.x);
  const T* out = static_cast<const T*>(p.rows) + i * p.dim;
  T* y = static_cast<T*>(p.y);
  const double g = p.gate != nullptr ? p.gate[i] : 1.0;
  for (int64_t j = threadIdx.x; j < p.dim; j += blockDim.x) {
    const double v = static_cast<double>(to_f(res[r * p.dim + j])) + static_cast<double>(to_f(out[j])) * g;
    y[r * p.dim + j] = from_f<T>(static_cast<float>(v));
  }
}

template <typename T>
__global__ void scatter_backward_kernel(const RowsParams p) {
  __shared__ double partial[kThreads / 32];
  const int64_t i = blockIdx.x, r = p.idx[i];
  const bool valid = r >= 0 && r < p.n;
  const T* dy = static_cast<const T*>(p.x);
  const T* out = static_cast<const T*>(p.rows) + i * p.dim;
  T* d_out = static_cast<T*>(p.y) + i * p.dim;
  const double g = p.gate != nullptr ? p.gate[i] : 1.0;
  double dot = 0.0;
  for (int64_t j = threadIdx.x; j < p.dim; j += blockDim.x) {
    const double d = valid ? static_cast<double>(to_f(dy[r * p.dim + j])) : 0.0;
    d_out[j] = from_f<T>(static_cast<float>(d * g));
    dot += d * static_cast<double>(to_f(out[j]));
  }
  if (p.d_gate == nullptr) return;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    p.d_gate[i] = static_cast<float>(total);
  }
}

Status check(const RowsParams& p, bool needs_rows) {
  if (!is_float_activation(p.dtype)) return Status::invalid("gather_rows / scatter_add_gated: dtype must be float32, float16 or bfloat16");
  if (p.n < 0 || p.m < 0 || p.dim <= 0 || p.m >= (int64_t{1} << 31)) return Status::invalid("gather_rows / scatter_add_gated: bad sizes");
  if ((p.m > 0 && (p.idx == nullptr || p.y == nullptr || (needs_rows && p.rows == nullptr))) ||
      (p.n > 0 && p.x == nullptr)) {
    return Status::invalid("gather_rows / scatter_add_gated: null pointer argument");
  }
  return Status::ok();
}

template <template <typename> class K>
Status launch(const RowsParams& p, cudaStream_t stream) {
  if (p.m == 0) return Status::ok();
  switch (p.dtype) {
    case DType::kFloat32:
      K<float>::run(p, stream);
      break;
    case DType::kFloat16:
      K<__half>::run(p, stream);
      break;
    case DType::kBFloat16:
      K<__nv_bfloat16>::run(p, stream);
      break;
    default:
      return Status::invalid("gather_rows / scatter_add_gated: dtype must be float32, float16 or bfloat16");
  }
  return cuda::last_launch_status();
}

template <typename T>
struct Gather {
  static void run(const RowsParams& p, cudaStream_t s) { gather_kernel<T><<<static_cast<unsigned>(p.m), kThreads, 0, s>>>(p); }
};
template <typename T>
struct Scatter {
  static void run(const RowsParams& p, cudaStream_t s) { scatter_kernel<T><<<static_cast<unsigned>(p.m), kThreads, 0, s>>>(p); }
};
template <typename T>
struct ScatterBackward {
  static void run(const RowsParams& p, cudaStream_t s) {
    scatter_backward_kernel<T><<<static_cast<unsigned>(p.m), kThreads, 0, s>>>(p);
  }
};

}  // namespace

Status gather_rows_cuda(const RowsParams& p, void* stream) {
  if (Status s = check(p, false); !s.is_ok()) return s;
  return launch<Gather>(p, static_cast<cudaStream_t>(stream));
}

Status scatter_add_gated_cuda(const RowsParams& p, void* stream) {
  if (Status s = check(p, true); !s.is_ok()) return s;
  const auto st = static_cast<cudaStream_t>(stream);
  if (p.y != p.x && p.n > 0) {
    const size_t bytes = static_cast<size_t>(p.n * p.dim) * (p.dtype == DType::kFloat32 ? 4 : 2);
    if (cudaMemcpyAsync(p.y, p.x, bytes, cudaMemcpyDeviceToDevice, st) != cudaSuccess) {
      return cuda::last_launch_status();
    }
  }
  return launch<Scatter>(p, st);
}

Status scatter_add_gated_backward_cuda(const RowsParams& p, void* stream) {
  if (Status s = check(p, true); !s.is_ok()) return s;
  return launch<ScatterBackward>(p, static_cast<cudaStream_t>(stream));
}

}  // namespace fastlayers::skip
