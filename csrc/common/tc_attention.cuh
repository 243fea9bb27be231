// SPDX-License-Identifier: Apache-2.0
// The tensor-core core of the attention kernels (varlen_cuda.cu, kvint4_cuda.cu prefill), in the
// FlashAttention-2 arrangement: a CTA of 4 warps owns 64 query rows (16 per warp) of one head and
// walks 64-key tiles that the kernel has put in shared memory as fp16/bf16 (Q, K and V rows with a
// 16-byte padded stride: ldmatrix reads them without bank conflicts). Per tile and warp, everything
// stays in registers (common/ptx.cuh's mma.sync m16n8k16 and ldmatrix):
//   S = Q K^T (fp32 accumulation; the Q fragments are loaded once, or at head_dim 256 read from
//   shared memory per use: Q's region must then stay as it is), the kernel's visible(row, key)
//   mask, an online softmax in base 2 (each row's 64 scores sit in the 4 lanes of a quad: two
//   shuffles per reduction), P rounded to the input dtype (as FlashAttention) and reused as the A
//   fragments of O += P V (V through a transposing ldmatrix), O rescaled in registers.
// The row sums are kept per lane and reduced at the end. The kernel supplies the loads (cp.async:
// load_rows_async), the mask and the epilogue; this header owns the arithmetic. fp32 queries
// (WarpTile's kSplit): Q and P as fp16 hi + lo parts, two products each.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/ptx.cuh"

namespace fastlayers::cuda::tc {

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // query rows per CTA
constexpr int kKeys = 64;           // keys per tile
constexpr int kPad = 8;             // 16-bit row padding (elements): 16 bytes, conflict-free ldmatrix

// Keys of 192 channels with values of 128 (DeepSeek's multi-head latent attention unabsorbed,
// MiMo-V2-Flash): the attention kernels' tensor-core shape besides d == dv.
constexpr int kWideKeyD = 192, kWideKeyDv = 128;

template <int D, int DV>
struct Dims {
  static constexpr int kD = D, kDV = DV;
};

// The tile's head sizes (varlen_attention forward and backward, the INT4 KV prefill): d == dv in
// {64, 80 (Phi-2, StableLM 3B), 96 (Phi-3), 128, 256 (Gemma 2 / 3)}, and keys of 192 with values of
// 128. Returns f(Dims<d, dv>{}) for one of them, `otherwise` for the rest: one list for the shapes'
// shared memory and their launches.
template <typename R, typename F>
R with_dims(int64_t d, int64_t dv, R otherwise, F&& f) {
  if (d == kWideKeyD && dv == kWideKeyDv) return f(Dims<kWideKeyD, kWideKeyDv>{});
  if (d != dv) return otherwise;
  switch (d) {
    case 64:
      return f(Dims<64, 64>{});
    case 80:
      return f(Dims<80, 80>{});
    case 96:
      return f(Dims<96, 96>{});
    case 128:
      return f(Dims<128, 128>{});
    case 256:
      return f(Dims<256, 256>{});
    default:
      return otherwise;
  }
}

// Shared-memory layout (byte offsets; each region 128-byte aligned) for queries and keys of D
// channels and values of DV. kExtra: where the kernel's own arrays start; bytes(extra) the total.
template <int D, int DV = D>
struct Smem {
  static constexpr int kLd = D + kPad;    // Q and K rows
  static constexpr int kLdV = DV + kPad;  // V rows
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + size_t(kRows) * kLd * 2;
  static constexpr size_t kV = kK + size_t(kKeys) * kLd * 2;
  static constexpr size_t kExtra = kV + size_t(kKeys) * kLdV * 2;
  static constexpr size_t bytes(size_t extra) { return kExtra + extra; }
  static_assert(kK % 128 == 0 && kV % 128 == 0 && kExtra % 128 == 0, "regions stay 128-byte aligned");
};

// Shared memory a block of the current device may opt in to, and that device (0 bytes when it
// cannot be queried).
inline size_t optin_smem(int* device_out) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device_out != nullptr) *device_out = device;
  return static_cast<size_t>(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device));
}

// Opts kernel in to `bytes` of dynamic shared memory on the current device, once per device
// (configured: the kernel's flags; a kernel whose calls differ in size opts in to its largest).
template <typename Params>
Status opt_in(void (*kernel)(Params), size_t bytes, bool (&configured)[64]) {
  int device = 0;
  optin_smem(&device);
  if (device < 0 || device >= 64 || !configured[device]) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes));
    if (e != cudaSuccess) return Status{StatusCode::kCudaError, cudaGetErrorString(e)};
    if (device >= 0 && device < 64) configured[device] = true;
  }
  return Status::ok();
}

// Launches kernel<<<grid, kWarps * 32, smem>>>(params) after the opt-in above 48 KiB (once per
// device for each kernel).
template <typename Params>
Status launch(void (*kernel)(Params), dim3 grid, size_t smem, const Params& params, cudaStream_t stream,
              bool (&configured)[64]) {
  if (Status s = opt_in(kernel, smem, configured); !s.is_ok()) return s;
  kernel<<<grid, kWarps * 32, smem, stream>>>(params);
  return last_launch_status();
}

// Whether a row's softmax sum makes an output: it saw a key (> 0) or is NaN (a NaN score, or
// inf - inf: propagated, as in the reference). A row that saw no key gets zeros and lse -inf.
__device__ __forceinline__ bool seen(float sum) { return sum > 0.0f || sum != sum; }

// A visible key's score in base 2 (x: the scaled, soft-capped score). -inf is what the tiles give
// masked keys, and scores_to_p weighs it 0; a visible key's -inf (a query with an infinite
// channel, which makes every score of its row +-inf or NaN) becomes NaN instead, so that a row whose
// visible scores are all -inf comes out NaN, as the reference's softmax does, not as a row that saw
// no key (zeros).
__device__ __forceinline__ float visible_score(float x) { return x == -INFINITY ? NAN : x * 1.4426950408889634f; }

// The online softmax's step for a lane's two rows (g and g + 8 of its 16: each row's scores in the
// 4 lanes of a quad) from this tile's per-lane maxima mx (base-2 scaled scores): mx becomes the
// quad's, m the new running maxima, alpha the factors for O and l (l already scaled by them).
__device__ __forceinline__ void online_max_step(float (&mx)[2], float (&m)[2], float (&l)[2], float (&alpha)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    const float m_new = fmaxf(m[h], mx[h]);
    // Nothing visible yet: O and l stay 0 (alpha 1). First visible keys: the old O is 0 (alpha 0).
    alpha[h] = m_new == -INFINITY ? 1.0f : (m[h] == -INFINITY ? 0.0f : exp2f(m[h] - m_new));
    m[h] = m_new;
    l[h] *= alpha[h];
  }
}

// P = exp2(s - m) of a lane's scores in place (masked ones, -inf, give 0), for its rows g (e 0, 1)
// and g + 8 (e 2, 3); their sums added to the lane's l.
template <int NB>
__device__ __forceinline__ void scores_to_p(float (&s)[NB][4], const float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pj = s[nb][e] == -INFINITY ? 0.0f : exp2f(s[nb][e] - m[e >> 1]);
      l[e >> 1] += pj;
      s[nb][e] = pj;
    }
  }
}

// Score-layout accumulators (16 rows x 8 NB columns: lane l holds rows l / 4 and + 8, columns
// 2 (l % 4) and + 1 of each 8-column block) rounded to T as the A fragments of a product over those
// columns: blocks 2kk and 2kk + 1 are the fragment of columns 16kk..16kk+15.
template <typename T, int NB>
__device__ __forceinline__ void to_a_fragments(const float (&s)[NB][4], uint32_t (&a)[NB / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    a[kk][0] = ptx::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    a[kk][1] = ptx::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    a[kk][2] = ptx::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[kk][3] = ptx::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// The rounding errors of to_a_fragments's fragments `hi` of s, as fragments of their own (s - hi
// rounded to T: the lo parts of P = P_hi + P_lo for fp32 results).
template <typename T, int NB>
__device__ __forceinline__ void lo_fragments(const float (&s)[NB][4], const uint32_t (&hi)[NB / 2][4],
                                             uint32_t (&lo)[NB / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    const float* src[4] = {&s[2 * kk][0], &s[2 * kk][2], &s[2 * kk + 1][0], &s[2 * kk + 1][2]};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float h0, h1;
      ptx::unpack2<T>(hi[kk][r], h0, h1);
      lo[kk][r] = ptx::pack2<T>(src[r][0] - h0, src[r][1] - h1);
    }
  }
}

// c[16 x 8 NB] += A B^T, both operands row-major in shared memory with row stride ld (elements):
// A's 16 rows of K channels from `a` (ldmatrix per 16 channels), B's 8 NB rows of K channels from
// `b` (the scores' form: Q K^T, and in the backward dO V^T, K Q^T, V dO^T).
template <typename T, int K, int NB>
__device__ __forceinline__ void mma_abt(float (&c)[NB][4], const T* a, const T* b, int ld) {
  static_assert(K % 16 == 0 && NB % 2 == 0, "whole 16-channel steps, pairs of 8-row blocks");
  const int lane = threadIdx.x & 31;
  const T* arow = a + (lane & 15) * ld + (lane >> 4) * 8;
  const T* brow = b + ((lane >> 4) * 8 + (lane & 7)) * ld + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    ptx::ldmatrix_x4(af, arow + kk * 16);
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t bf[4];
      ptx::ldmatrix_x4(bf, brow + nb * 8 * ld + kk * 16);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      ptx::mma_16816<T>(c[nb], af, b0);
      ptx::mma_16816<T>(c[nb + 1], af, b1);
    }
  }
}

// c[16 x 8 NB] += A B with A as fragments (16 rows x 16 KB, to_a_fragments's) and B row-major in
// shared memory (16 KB rows of 8 NB columns, stride ld; a transposing ldmatrix): the P V form (and
// in the backward dS K, P^T dO, dS^T Q).
template <typename T, int KB, int NB>
__device__ __forceinline__ void mma_ab(float (&c)[NB][4], const uint32_t (&a)[KB][4], const T* b, int ld) {
  static_assert(NB % 2 == 0, "pairs of 8-column blocks");
  const int lane = threadIdx.x & 31;
  const T* brow = b + (((lane >> 3) & 1) * 8 + (lane & 7)) * ld + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t bf[4];
      ptx::ldmatrix_x4_trans(bf, brow + kk * 16 * ld + nb * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      ptx::mma_16816<T>(c[nb], a[kk], b0);
      ptx::mma_16816<T>(c[nb + 1], a[kk], b1);
    }
  }
}

// The mask of a tile that every row sees whole.
struct AllVisible {
  __device__ bool operator()(int, int) const { return true; }
};

// One warp's 16 query rows: queries and keys of D channels, values (and the output) of DV.
// Construct after Q is in shared memory (and a __syncthreads()).
// Lane l holds rows g = l / 4 and g + 8 of the warp's 16 (h = 0, 1), and in each 8-column block
// the columns 2 (l % 4) and + 1.
// kSplit (fp32 queries, fp32 results): Q = Q_hi + Q_lo and P = P_hi + P_lo in T, two products
// each, so that scores and output keep about 22 bits; the kernel puts Q_lo in shared memory (rows
// as Q's, read by ldmatrix per use: only Q_hi stays in registers), sets sq_lo and use_lo (false
// when its lo parts are negligible: one Q K^T product then) and the rows' score scales rs (the
// queries' per-row factors undone).
template <typename T, int D, bool kSplit = false, int DV = D>
struct WarpTile {
  using S = Smem<D, DV>;
  static constexpr int kKeyBlocks = kKeys / 8;  // 8-key blocks of the scores
  static constexpr int kColBlocks = DV / 8;     // 8-column blocks of the output
  static_assert(D % 16 == 0 && DV % 16 == 0, "head sizes are multiples of 16");
  // Q's fragments stay in registers up to head_dim 128; beyond (at 256 they would take 64
  // registers beside O's 128) they are read from shared memory per use (as FlashAttention-2 does).
  static constexpr bool kQInRegs = D <= 128;

  const T* sk;
  const T* sv;
  const T* sq;
  int qoff;                               // this lane's ldmatrix row of Q (and Q_lo)
  uint32_t qf[kQInRegs ? D / 16 : 1][4];  // Q as A fragments, 16 channels each (kQInRegs)
  float o[kColBlocks][4];  // the output accumulator
  float m[2] = {-INFINITY, -INFINITY};  // running maxima (base-2 scaled scores) of rows g, g + 8
  float l[2] = {0.0f, 0.0f};            // this lane's part of their sums
  float rs[2] = {1.0f, 1.0f};           // rows g, g + 8: their scores' factors (times `scale`)
  const T* sq_lo = nullptr;             // kSplit: Q_lo (Q's layout), read when use_lo
  bool use_lo = false;
  int warp, lane;

  __device__ explicit WarpTile(const unsigned char* smem) {
    warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
    sq = reinterpret_cast<const T*>(smem + S::kQ);
    sk = reinterpret_cast<const T*>(smem + S::kK);
    sv = reinterpret_cast<const T*>(smem + S::kV);
    // Tiles: rows 0-7 / 8-15 (lanes 0-15) then channels + 8 (lanes 16-31).
    qoff = (warp * 16 + (lane & 15)) * S::kLd + (lane >> 4) * 8;
    if constexpr (kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4(qf[kk], sq + qoff + kk * 16);
    }
#pragma unroll
    for (int nb = 0; nb < kColBlocks; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nb][e] = 0.0f;
    }
  }

  // The CTA row (0..kRows) of this lane's row h.
  __device__ int cta_row(int h) const { return warp * 16 + (lane >> 2) + 8 * h; }
  // The tile key of this lane's score e of key block nb.
  __device__ int key_of(int nb, int e) const { return nb * 8 + 2 * (lane & 3) + (e & 1); }

  // S = Q K^T of the tile in shared memory (K complete), masked (visible(cta_row, key) -> bool),
  // scaled (softcap > 0: s -> softcap * tanh(s / softcap), Gemma 2), the online softmax update;
  // leaves P as the A fragments of the P V product (16 keys each).
  // kSplit: p_lo gets P - P_hi (P_hi in p); unused otherwise.
  template <class Visible>
  __device__ void softmax(const Visible& visible, float scale, float softcap, uint32_t (&p)[kKeys / 16][4],
                          uint32_t (&p_lo)[kKeys / 16][4]) {
    float s[kKeyBlocks][4];
#pragma unroll
    for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    }
    // Tiles of one ldmatrix: keys +0-7 channels +0 / +8 (b[0], b[1] of block nb), keys +8-15 (nb + 1).
    const T* krow = sk + ((lane >> 4) * 8 + (lane & 7)) * S::kLd + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t q[4];  // Q's fragment of channels 16 kk .. 16 kk + 15
      if constexpr (kQInRegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) q[r] = qf[kk][r];
      } else {
        ptx::ldmatrix_x4(q, sq + qoff + kk * 16);
      }
      uint32_t qlo[4];  // kSplit: Q_lo's (read when used: warp-uniform)
      if (kSplit && use_lo) ptx::ldmatrix_x4(qlo, sq_lo + qoff + kk * 16);
#pragma unroll
      for (int nb = 0; nb < kKeyBlocks; nb += 2) {
        uint32_t kf[4];
        ptx::ldmatrix_x4(kf, krow + nb * 8 * S::kLd + kk * 16);
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        ptx::mma_16816<T>(s[nb], q, b0);
        ptx::mma_16816<T>(s[nb + 1], q, b1);
        if (kSplit && use_lo) {
          ptx::mma_16816<T>(s[nb], qlo, b0);
          ptx::mma_16816<T>(s[nb + 1], qlo, b1);
        }
      }
    }

    const float row_scale[2] = {scale * rs[0], scale * rs[1]};
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nb][e] * row_scale[e >> 1];
        if (softcap > 0.0f) x = softcap * tanhf(x / softcap);
        x = visible(cta_row(e >> 1), key_of(nb, e)) ? visible_score(x) : -INFINITY;
        s[nb][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2];
    online_max_step(mx, m, l, alpha);
#pragma unroll
    for (int nb = 0; nb < kColBlocks; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nb][e] *= alpha[e >> 1];
    }
    scores_to_p(s, m, l);
    to_a_fragments<T>(s, p);
    if constexpr (kSplit) lo_fragments<T>(s, p, p_lo);
  }

  // O += P V with the tile's V in shared memory (complete); kSplit: O += (P + P_lo) V, each V
  // fragment read once for both.
  __device__ void accumulate(const uint32_t (&p)[kKeys / 16][4], const uint32_t (&p_lo)[kKeys / 16][4]) {
    // Tiles of one transposing ldmatrix: keys +0-7 / +8-15 of columns +0-7 (b[0], b[1] of block
    // nb), then of columns +8-15 (block nb + 1).
    const T* vrow = sv + (((lane >> 3) & 1) * 8 + (lane & 7)) * S::kLdV + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
      for (int nb = 0; nb < kColBlocks; nb += 2) {
        uint32_t vf[4];
        ptx::ldmatrix_x4_trans(vf, vrow + kk * 16 * S::kLdV + nb * 8);
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        ptx::mma_16816<T>(o[nb], p[kk], b0);
        ptx::mma_16816<T>(o[nb + 1], p[kk], b1);
        if constexpr (kSplit) {
          ptx::mma_16816<T>(o[nb], p_lo[kk], b0);
          ptx::mma_16816<T>(o[nb + 1], p_lo[kk], b1);
        }
      }
    }
  }

  __device__ void accumulate(const uint32_t (&p)[kKeys / 16][4]) {
    static_assert(!kSplit, "a split tile takes P's lo parts too");
    accumulate(p, p);
  }

  // Both halves of a tile whose K and V are in shared memory.
  template <class Visible>
  __device__ void step(const Visible& visible, float scale, float softcap = 0.0f) {
    uint32_t p[kKeys / 16][4], p_lo[kKeys / 16][4];
    softmax(visible, scale, softcap, p, p_lo);
    accumulate(p, p_lo);
  }

  // out_row(cta_row) -> Out* (nullptr: not written) gets O / l for each of the lane's rows (zeros
  // when the row saw nothing); put_lse(cta_row, lse) once per row, lse = m + log l (-inf then).
  template <typename Out, class OutRow, class PutLse>
  __device__ void finish(const OutRow& out_row, const PutLse& put_lse) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = seen(sum) ? 1.0f / sum : 0.0f;
      Out* out = out_row(cta_row(h));
      if (out != nullptr) {
#pragma unroll
        for (int nb = 0; nb < kColBlocks; ++nb) {
          const int c = nb * 8 + 2 * (lane & 3);
          out[c] = from_f<Out>(o[nb][2 * h] * inv);
          out[c + 1] = from_f<Out>(o[nb][2 * h + 1] * inv);
        }
      }
      if ((lane & 3) == 0) {
        put_lse(cta_row(h), seen(sum) ? (m[h] + log2f(sum)) * 0.6931471805599453f : -INFINITY);
      }
    }
  }
};

// Issues the copies of `rows` rows of D 16-bit values into shared memory (row i from row_ptr(i),
// stride ld), 16 bytes per thread and step, as cp.async; rows >= valid, and rows whose pointer is
// null, are zero-filled with plain stores. The caller commits, waits and synchronises.
template <typename T, int D, typename RowPtr>
__device__ void load_rows_async(T* dst, int ld, int rows, int valid, const RowPtr& row_ptr) {
  constexpr int kVec = 8;
  for (int i = threadIdx.x; i < rows * D / kVec; i += blockDim.x) {
    const int row = i / (D / kVec), c = (i % (D / kVec)) * kVec;
    const T* src = row < valid ? row_ptr(row) : nullptr;
    if (src != nullptr) {
      ptx::cp_async_16(dst + row * ld + c, src + c, 16);
    } else {
      *reinterpret_cast<uint4*>(dst + row * ld + c) = make_uint4(0, 0, 0, 0);
    }
  }
}

}  // namespace fastlayers::cuda::tc
