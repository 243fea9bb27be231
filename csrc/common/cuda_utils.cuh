// SPDX-License-Identifier: Apache-2.0
// Small device helpers shared by the CUDA kernels: fp32 conversion of the storage types, aligned
// vectors for 16-byte loads, warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/status.h"

namespace fastlayers::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The value a float takes after a round trip through T (what an unfused model would see).
template <typename T>
__device__ __forceinline__ float round_f(float v) {
  return to_f(from_f<T>(v));
}

// Saturating like the reference's clamp(-448, 448) + cast, and NaN stays NaN. (An fminf/fmaxf clamp
// first would turn NaN into -448: fmaxf returns the non-NaN operand.)
__device__ __forceinline__ uint8_t to_fp8e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// a / b rounded to nearest even, exactly as the IEEE division, through b's reciprocal: with
// r = RN(1 / b) and q = RN(a r), RN(q + (a - q b) r) is the correctly rounded quotient (Markstein's
// theorem: r within half an ulp of 1 / b, q within an ulp of a / b, the residual a - q b exact by
// the fused multiply-add, which holds barring underflow). Where underflow or overflow could break
// that (b, |a| or |q| below 2^-100, b or |q| above 2^100, a negative b; zeros, whose sign the
// correction would lose, infinities and NaN), the division itself. One multiply and two
// multiply-adds per element instead of a division, for many elements over one divisor (the FP8
// quantization of a row by its scale). Checked against the division on 4e8 random pairs (any bit
// patterns, and RMSNorm-like rows: b = amax / 448, |a| <= amax), bit for bit.
struct ReciprocalDivisor {
  float b, r;
  bool ok;
  __device__ explicit ReciprocalDivisor(float divisor)
      : b(divisor), r(1.0f / divisor), ok(divisor >= 0x1p-100f && divisor <= 0x1p100f) {}
  __device__ float operator()(float a) const {
    const float q = a * r;  // (used twice below: never contracted into a multiply-add)
    const float aa = fabsf(a), aq = fabsf(q);
    if (ok && aa >= 0x1p-100f && aq >= 0x1p-100f && aq <= 0x1p100f) return fmaf(fmaf(-q, b, a), r, q);
    return a / b;
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// A vector of N elements to fp32.
template <int N, typename T>
__device__ __forceinline__ void to_f(const Vec<T, N>& t, float (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_f(t.v[j]);
}

// Loads/stores N consecutive elements starting at element index i * N, converting to/from fp32.
template <int N, typename T>
__device__ __forceinline__ void load_f(const T* p, int64_t i, float (&out)[N]) {
  to_f(reinterpret_cast<const Vec<T, N>*>(p)[i], out);
}

template <int N, typename T>
__device__ __forceinline__ void store_f(T* p, int64_t i, const float (&in)[N]) {
  Vec<T, N> t;
#pragma unroll
  for (int j = 0; j < N; ++j) t.v[j] = from_f<T>(in[j]);
  reinterpret_cast<Vec<T, N>*>(p)[i] = t;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// a . b over n elements by one warp: lane-strided (coalesced) loads, fp32, the sum in every lane.
// Eight partial sums per lane, so that eight loads of each operand are in flight at once: with one
// running sum the loop waited on memory load by load, and a single token's FFF descent (one
// dependent dot product per level) took 80-120 us on the H200 (bench/results/h200-run-log.md).
template <typename A, typename B>
__device__ __forceinline__ float warp_dot(const A* a, const B* b, int64_t n) {
  constexpr int kUnroll = 8;
  float s[kUnroll] = {};
  int64_t i = threadIdx.x & 31;
  for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) s[u] += to_f(a[i + 32 * u]) * to_f(b[i + 32 * u]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {  // the last (fewer than kUnroll) elements of the lane
    if (i + 32 * u < n) s[u] += to_f(a[i + 32 * u]) * to_f(b[i + 32 * u]);
  }
#pragma unroll
  for (int u = 1; u < kUnroll; ++u) s[0] += s[u];
  return warp_sum(s[0]);
}

// max(a, b) where a NaN in either wins and stays, as torch's amax and the CPU kernels: the result
// of a reduction does not depend on its order.
__device__ __forceinline__ float nan_max(float a, float b) { return b > a || b != b ? b : a; }

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum of K values, returned to every thread. blockDim.x must be a multiple of 32;
// `smem` holds 32 * K floats. Safe to call repeatedly (it syncs before reusing smem).
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < warps ? smem[k * 32 + lane] : 0.0f);
}

// Block-wide max of non-negative values (an amax), NaN when any is NaN, returned to every thread.
// blockDim.x must be a multiple of 32; `smem` holds 32 floats.
__device__ __forceinline__ float block_nan_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_nan_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_nan_max(lane < warps ? smem[lane] : 0.0f);
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Body of a launcher that returns fn<T>(p, stream) for the three activation dtypes (float, __half,
// __nv_bfloat16), the CUDA twin of FL_CPU_BY_FLOAT_DTYPE.
#define FL_CUDA_BY_FLOAT_DTYPE(fn, p, stream, message)                       \
  switch ((p).dtype) {                                                      \
    case DType::kFloat32:                                                   \
      return fn<float>((p), (stream));                                      \
    case DType::kFloat16:                                                   \
      return fn<__half>((p), (stream));                                     \
    case DType::kBFloat16:                                                  \
      return fn<__nv_bfloat16>((p), (stream));                              \
    default:                                                                \
      return Status::invalid(message);                                      \
  }

// A device attribute, queried once per device (0 when it cannot be queried, or for devices past 63).
template <cudaDeviceAttr kAttr>
int device_attribute(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, kAttr, device) == cudaSuccess) cache[device] = v;
  }
  return cache[device];
}

inline Status last_launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status{StatusCode::kCudaError, cudaGetErrorString(err)};
  return Status::ok();
}

}  // namespace fastlayers::cuda
