// SPDX-License-Identifier: Apache-2.0
// Kernels with the bugs the CUDA emulation must catch, and their correct twins (built into the
// emulation build only; tests/test_cuda_emu.py runs them through _C.cuda_emu_selftest).
#include <cuda_runtime.h>

#include <cstring>

#include "common/ptx.cuh"

namespace fastlayers::cuda_emu_selftest {
namespace {

// out[i] = i + (63 - i) = 63 for a block of 64 threads, once every thread has written its slot.
template <bool kBarrier>
__global__ void reverse_through_shared(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = static_cast<float>(threadIdx.x) + s[63 - threadIdx.x];
}

// reverse_through_shared with a warp shuffle between the write and the read (out[i] = (i ^ 1) +
// (63 - i)): the shuffle is no barrier between warps, so without kBarrier the read of the other
// warp's slot is still a race.
template <bool kBarrier>
__global__ void reverse_past_a_shuffle(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (kBarrier) __syncthreads();
  const float partner = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
  out[threadIdx.x] = partner + s[63 - threadIdx.x];
}

// A full-mask shuffle: undefined in a block of 48 threads (the second warp has 16 lanes).
__global__ void shuffle(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = v + __shfl_xor_sync(0xffffffffu, v, 1);
}

// Lanes 0-15 wait at a warp barrier that lanes 16-31, waiting at the block's, never join.
__global__ void deadlock(float* out) {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// The two warps wait at different __syncthreads() call sites: undefined on a GPU.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = 1.0f;
    __syncthreads();
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

__global__ void __launch_bounds__(64) bounded(float* out) { out[threadIdx.x] = 1.0f; }

__global__ void dynamic_shared(float* out) {
  extern __shared__ float big[];
  big[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x];
}

// Block 1 copies what block 0 writes in the same launch: blocks run in no order on a GPU.
__global__ void across_blocks(float* out) {
  if (blockIdx.x == 0) {
    out[threadIdx.x] = 1.0f;
  } else {
    out[32 + threadIdx.x] = out[threadIdx.x];
  }
}

// a * b + c from memory (the compiler sees no constants): one fused multiply-add, as nvcc
// contracts it, into out[3] (thread 0); with __fmul_rn (never contracted) into out[4] (thread 1).
__global__ void contraction(float* out) {
  if (threadIdx.x == 0) {
    out[3] = out[0] * out[1] + out[2];
  } else {
    out[4] = __fmul_rn(out[0], out[1]) + out[2];
  }
}

// out[32 + i] = out[i] (i < 32) through shared memory by cp.async, 16 bytes per thread of 8; with
// kWait the copies are waited for before the barrier, without it they are read still in flight.
template <bool kWait>
__global__ void async_copy(float* out) {
  __shared__ __align__(16) float s[32];
  if (threadIdx.x < 8) cuda::ptx::cp_async_16(s + 4 * threadIdx.x, out + 4 * threadIdx.x, 16);
  cuda::ptx::cp_async_commit();
  if (kWait) cuda::ptx::cp_async_wait<0>();
  __syncthreads();
  out[32 + threadIdx.x] = s[threadIdx.x];
}

// One warp: D = A B (16x16 by 16x8, fp16 small integers: exact) through ldmatrix + mma.sync, B read
// both as the rows of B^T (plain ldmatrix, as attention reads K) and as the rows of B (transposing
// ldmatrix, as it reads V); out[0], out[1]: the largest error of each against the plain sum, out[2]
// the largest |D| (not 0: the product was made).
__global__ void mma_fragments(float* out) {
  __shared__ __align__(16) __half a[16][24];   // row-major, padded as attention pads
  __shared__ __align__(16) __half bt[8][24];   // B^T: bt[n][k]
  __shared__ __align__(16) __half b[16][16];   // B: b[k][n], columns 8-15 unused
  __shared__ float d[2][16][8];
  const int lane = threadIdx.x;
  for (int e = lane; e < 16 * 16; e += 32) {
    const int i = e / 16, k = e % 16;
    a[i][k] = __float2half(static_cast<float>((i * 16 + k) % 7 - 3));
  }
  for (int e = lane; e < 16 * 8; e += 32) {
    const int k = e / 8, n = e % 8;
    const __half x = __float2half(static_cast<float>((k * 8 + n) % 5 - 2));
    bt[n][k] = x;
    b[k][n] = x;
  }
  __syncthreads();
  uint32_t af[4], bf[4], tf[4];
  cuda::ptx::ldmatrix_x4(af, &a[lane % 16][(lane / 16) * 8]);
  // Tiles 0, 1: B^T rows (n) with k 0-7 / 8-15; tiles 2, 3 the same again (x4 needs four).
  cuda::ptx::ldmatrix_x4(bf, &bt[lane % 8][((lane / 8) % 2) * 8]);
  // Tiles 0, 1: B rows k 0-7 / 8-15 (transposed); tiles 2, 3 the same again.
  cuda::ptx::ldmatrix_x4_trans(tf, &b[((lane / 8) % 2) * 8 + lane % 8][0]);
  float d0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {tf[0], tf[1]};
  cuda::ptx::mma_16816<__half>(d0, af, b0);
  cuda::ptx::mma_16816<__half>(d1, af, b1);
  for (int e = 0; e < 4; ++e) {
    const int i = lane / 4 + 8 * (e / 2), j = 2 * (lane % 4) + e % 2;
    d[0][i][j] = d0[e];
    d[1][i][j] = d1[e];
  }
  __syncthreads();
  if (lane == 0) {
    float err[2] = {0.0f, 0.0f}, big = 0.0f;
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        float want = 0.0f;
        for (int k = 0; k < 16; ++k) want += __half2float(a[i][k]) * __half2float(b[k][j]);
        for (int w = 0; w < 2; ++w) err[w] = fmaxf(err[w], fabsf(d[w][i][j] - want));
        big = fmaxf(big, fabsf(want));
      }
    }
    out[0] = err[0];
    out[1] = err[1];
    out[2] = big;
  }
}

}  // namespace

// Runs case `which` into out (64 floats); returns the launch's error string, or "ok".
const char* run(int which, float* out) {
  cudaGetLastError();
  switch (which) {
    case 0:
      reverse_through_shared<true><<<1, 64>>>(out);
      break;
    case 1:
      reverse_through_shared<false><<<1, 64>>>(out);
      break;
    case 2:
      shuffle<<<1, 64>>>(out);
      break;
    case 3:
      shuffle<<<1, 48>>>(out);
      break;
    case 4:
      deadlock<<<1, 32>>>(out);
      break;
    case 5:
      bounded<<<1, 64>>>(out);
      break;
    case 6:
      bounded<<<1, 128>>>(out);
      break;
    case 7:  // 64 KiB without the opt-in
      dynamic_shared<<<1, 64, 64 * 1024>>>(out);
      break;
    case 8:  // with it
      cudaFuncSetAttribute(dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
      dynamic_shared<<<1, 64, 64 * 1024>>>(out);
      break;
    case 9:
      across_blocks<<<2, 32>>>(out);
      break;
    case 10:
      contraction<<<1, 2>>>(out);
      break;
    case 11:
      async_copy<true><<<1, 32>>>(out);
      break;
    case 12:
      async_copy<false><<<1, 32>>>(out);
      break;
    case 13:
      mma_fragments<<<1, 32>>>(out);
      break;
    case 14:
      reverse_past_a_shuffle<true><<<1, 64>>>(out);
      break;
    case 15:
      reverse_past_a_shuffle<false><<<1, 64>>>(out);
      break;
    case 16:
      divergent_barrier<<<1, 64>>>(out);
      break;
    default:
      return "no such case";
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "ok" : cudaGetErrorString(e);
}

}  // namespace fastlayers::cuda_emu_selftest
