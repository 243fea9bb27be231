// SPDX-License-Identifier: Apache-2.0
// Kernels with the bugs the CUDA emulation must catch, and their correct twins (built into the
// emulation build only; tests/test_cuda_emu.py runs them through _C.cuda_emu_selftest).
#include <cuda_runtime.h>

#include <cstring>

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
    default:
      return "no such case";
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "ok" : cudaGetErrorString(e);
}

}  // namespace fastlayers::cuda_emu_selftest
