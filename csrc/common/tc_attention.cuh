// SPDX-License-Identifier: Apache-2.0
// The tensor-core core of the attention kernels (varlen_cuda.cu, kvint4_cuda.cu prefill): a CTA of
// 4 warps owns 64 query rows (16 per warp) of one head and walks 64-key tiles that the kernel has put
// in shared memory as fp16/bf16 (K and V rows, a 16-byte padded stride). Per tile and warp:
//   S = Q K^T on tensor cores (WMMA m16n16k16, fp32 accumulation; Q fragments stay in registers),
//   through shared memory into a masked online softmax (a lane pair per row, 32 keys each; the mask
//   is the kernel's visible(row, key) functor), P rounded to the input dtype (as FlashAttention),
//   O += P V on tensor cores with O kept per warp in an fp32 shared-memory tile, rescaled per row.
// The kernel supplies the loaders, the mask and the epilogue; this header owns the arithmetic.
#pragma once

#include <mma.h>

#include <cmath>
#include <cstddef>

#include "common/cuda_utils.cuh"

namespace fastlayers::cuda::tc {

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // query rows per CTA
constexpr int kKeys = 64;           // keys per tile
constexpr int kPadH = 8;            // 16-bit row padding (elements): WMMA ldm % 8, fewer bank conflicts
constexpr int kPadF = 4;            // fp32 row padding

// Shared-memory layout (byte offsets; every region a multiple of 32 bytes: WMMA pointers are
// 256-bit aligned). kExtra: where the kernel's own arrays start; kBytes(extra) the total.
template <int D>
struct Smem {
  static constexpr int kLdQ = D;
  static constexpr int kLdK = D + kPadH;        // K and V rows
  static constexpr int kLdS = kKeys + kPadF;    // scores (fp32)
  static constexpr int kLdP = kKeys + kPadH;    // probabilities (16-bit)
  static constexpr int kLdO = D + kPadF;        // output accumulator (fp32)
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + size_t(kRows) * kLdQ * 2;
  static constexpr size_t kV = kK + size_t(kKeys) * kLdK * 2;
  static constexpr size_t kS = kV + size_t(kKeys) * kLdK * 2;
  static constexpr size_t kP = kS + size_t(kWarps) * 16 * kLdS * 4;
  static constexpr size_t kO = kP + size_t(kWarps) * 16 * kLdP * 2;
  static constexpr size_t kExtra = kO + size_t(kWarps) * 16 * kLdO * 4;
  static constexpr size_t bytes(size_t extra) { return kExtra + extra; }
};

// Shared memory a block of the current device may opt in to, and that device (0 bytes when it
// cannot be queried).
inline size_t optin_smem(int* device_out) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device_out != nullptr) *device_out = device;
  return static_cast<size_t>(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device));
}

// Launches kernel<<<grid, kWarps * 32, smem>>>(params) after the opt-in above 48 KiB (once per
// device for each kernel).
template <typename Params>
Status launch(void (*kernel)(Params), dim3 grid, size_t smem, const Params& params, cudaStream_t stream,
              bool (&configured)[64]) {
  int device = 0;
  optin_smem(&device);
  if (device < 0 || device >= 64 || !configured[device]) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return Status{StatusCode::kCudaError, cudaGetErrorString(e)};
    if (device >= 0 && device < 64) configured[device] = true;
  }
  kernel<<<grid, kWarps * 32, smem, stream>>>(params);
  return last_launch_status();
}

// One warp's 16 query rows. Construct after Q is in shared memory (and a __syncthreads()).
template <typename T, int D>
struct WarpTile {
  using S = Smem<D>;
  using FragQ = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;

  const T* sk;
  const T* sv;
  float* ss;
  T* sp;
  float* so;
  FragQ qf[D / 16];
  int warp, lane, r, half;  // r: this lane's row within the warp; half: its 32-key half of a tile
  float m = -INFINITY, l = 0.0f;

  __device__ explicit WarpTile(unsigned char* smem) {
    warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
    r = lane >> 1;
    half = lane & 1;
    const T* sq = reinterpret_cast<const T*>(smem + S::kQ);
    sk = reinterpret_cast<const T*>(smem + S::kK);
    sv = reinterpret_cast<const T*>(smem + S::kV);
    ss = reinterpret_cast<float*>(smem + S::kS) + warp * 16 * S::kLdS;
    sp = reinterpret_cast<T*>(smem + S::kP) + warp * 16 * S::kLdP;
    so = reinterpret_cast<float*>(smem + S::kO) + warp * 16 * S::kLdO;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      nvcuda::wmma::load_matrix_sync(qf[kk], sq + warp * 16 * S::kLdQ + kk * 16, S::kLdQ);
    }
    for (int i = lane; i < 16 * S::kLdO; i += 32) so[i] = 0.0f;
    __syncwarp();
  }

  // The CTA row (0..kRows) of this lane's row.
  __device__ int cta_row() const { return warp * 16 + r; }

  // One key tile (K and V in shared memory, complete): visible(cta_row, key_in_tile) -> bool.
  // softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) (Gemma 2).
  template <class Visible>
  __device__ void step(const Visible& visible, float scale, float softcap = 0.0f) {
    namespace wmma = nvcuda::wmma;
#pragma unroll
    for (int nb = 0; nb < kKeys / 16; ++nb) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;  // K^T from K's rows
        wmma::load_matrix_sync(kf, sk + nb * 16 * S::kLdK + kk * 16, S::kLdK);
        wmma::mma_sync(acc, qf[kk], kf, acc);
      }
      wmma::store_matrix_sync(ss + nb * 16, acc, S::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    const int row = cta_row();
    float sc[32];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int j = half * 32 + c;
      const float x = ss[r * S::kLdS + j] * scale;
      sc[c] = visible(row, j) ? (softcap > 0.0f ? softcap * tanhf(x / softcap) : x) : -INFINITY;
      mx = fmaxf(mx, sc[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    // Nothing visible yet: O and l stay 0 (alpha 1). First visible keys: the old O is 0 (alpha 0).
    const float alpha = m_new == -INFINITY ? 1.0f : (m == -INFINITY ? 0.0f : expf(m - m_new));
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const float pj = sc[c] == -INFINITY ? 0.0f : expf(sc[c] - m_new);
      sum += pj;
      sp[r * S::kLdP + half * 32 + c] = from_f<T>(pj);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    for (int c = half * (D / 2); c < (half + 1) * (D / 2); ++c) so[r * S::kLdO + c] *= alpha;
    __syncwarp();

#pragma unroll
    for (int nb = 0; nb < D / 16; ++nb) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, so + nb * 16, S::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, sp + kk * 16, S::kLdP);
        wmma::load_matrix_sync(vf, sv + kk * 16 * S::kLdK + nb * 16, S::kLdK);
        wmma::mma_sync(acc, pf, vf, acc);
      }
      wmma::store_matrix_sync(so + nb * 16, acc, S::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // out[c] = O[c] / l for this lane's half of the row's columns (zeros when the row saw nothing);
  // returns lse = m + log l (-inf then).
  template <typename Out>
  __device__ float finish(Out* out) const {
    const float inv = l > 0.0f || l != l ? 1.0f / l : 0.0f;  // NaN: propagated
    for (int c = half * (D / 2); c < (half + 1) * (D / 2); ++c) {
      out[c] = from_f<Out>(so[r * S::kLdO + c] * inv);
    }
    return l > 0.0f || l != l ? m + logf(l) : -INFINITY;
  }
};

// Copies `rows` rows of D 16-bit values (row i at src + i * src_stride elements; null: zeros) into
// shared memory with stride ld, 16 bytes per thread and step; rows >= valid are zero-filled.
template <typename T, int D, typename RowPtr>
__device__ void load_rows(T* dst, int ld, int rows, int valid, const RowPtr& row_ptr) {
  constexpr int kVec = 8;
  for (int i = threadIdx.x; i < rows * D / kVec; i += blockDim.x) {
    const int row = i / (D / kVec), c = (i % (D / kVec)) * kVec;
    uint4 w = make_uint4(0, 0, 0, 0);
    if (row < valid) {
      const T* src = row_ptr(row);
      if (src != nullptr) w = *reinterpret_cast<const uint4*>(src + c);
    }
    *reinterpret_cast<uint4*>(dst + row * ld + c) = w;
  }
}

}  // namespace fastlayers::cuda::tc
