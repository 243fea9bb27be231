// SPDX-License-Identifier: Apache-2.0
// CUDA varlen position-masked attention, forward (sm80+). First version, CUDA cores in fp32, written
// for correctness; its tests passed on an H200 (dd55068). The tensor-core forward below was
// rewritten after that run (common/tc_attention.cuh: registers, mma.sync, cp.async): its tests pass
// in the CPU emulation, it has not yet run on a GPU. Semantics: skip.h (VarlenParams) and
// python/fastlayers/reference/skip.py: query i of sequence b sees key j of b iff
// q_pos[i] - left <= k_pos[j] <= q_pos[i] + right (-1: unbounded), fp32 softmax, zeros and
// lse = -inf for a query that sees nothing (and for rows past the last sequence).
//
// One CTA (4 warps) per (tile of kRows packed query rows, query head). The tile's rows may span
// sequences: each row finds its sequence by binary search in cu_seqlens_q, and the CTA walks the key
// tiles covering the union of its rows' key ranges, skipping a key tile that no row can see (by the
// tile's position range). Positions need not increase (every key is masked individually), so the
// host does no layout check and nothing synchronises.
//   Scores: warp w owns rows 4w..4w+3; lane j scores key j of the 32-key tile against each row
//   (K tile in shared memory with a padded stride: conflict-free).
//   Online softmax per row with warp reductions; the output row is spread over the lanes
//   (dv / 32 columns each) and accumulates p_j V[j] with p_j broadcast by shuffles.
//
// Tensor-core forward (fp16/bf16, d == dv in {64, 128, 256}, 16-byte aligned q/k/v; at 256 where a
// block can have its ~100 KiB of shared memory: sm80, sm90): the same masking
// with common/tc_attention.cuh's tiles (64 query rows per CTA, 64-key tiles, mma.sync products and
// the online softmax in registers). K and V tiles arrive by cp.async (V during the scores). From the
// bounds of the CTA's row and the tile's key sequences and positions, a tile that no row can see is
// skipped before its K/V are loaded, and one that every row sees whole runs without the mask.
#include <cmath>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/tc_attention.cuh"
#include "skip/skip.h"

namespace fastlayers::skip {
namespace {

using cuda::from_f;
using cuda::to_f;
using cuda::tc::seen;  // (a softmax sum that makes an output: > 0, or NaN)

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per CTA
constexpr int kKeys = 32;                     // keys per tile (one per lane)
constexpr int kMaxDim = 256;                  // d and dv
// Channels per lane of a row in the CUDA-core kernels (template parameter C): 4 up to head dim
// 128, 8 beyond (up to kMaxDim).
constexpr int cols_for(int64_t d, int64_t dv) { return (d > dv ? d : dv) <= 128 ? 4 : 8; }

__device__ __forceinline__ int64_t sequence_of(const int32_t* cu, int64_t batch, int64_t row) {
  int64_t lo = 0, hi = batch;  // the b with cu[b] <= row < cu[b + 1]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ bool visible(int64_t qp, int64_t kp, int64_t left, int64_t right) {
  return (left < 0 || kp >= qp - left) && (right < 0 || kp <= qp + right);
}

// The keys a CTA of `rows` packed query rows from row0 may see: the union of its rows' sequences'
// key ranges (the first and last valid rows bound it, as sequences are packed in order).
__device__ __forceinline__ void cta_key_range(const VarlenParams& p, int64_t row0, int64_t rows,
                                              int64_t total_q, int64_t* range) {
  const int64_t first = row0, last = (row0 + rows < total_q ? row0 + rows : total_q) - 1;
  if (first < total_q) {
    const int64_t k1 = p.cu_seqlens_k[sequence_of(p.cu_seqlens_q, p.batch, last) + 1];
    range[0] = p.cu_seqlens_k[sequence_of(p.cu_seqlens_q, p.batch, first)];
    range[1] = k1 < p.nk ? k1 : p.nk;
  } else {
    range[0] = range[1] = 0;
  }
}

// Shared memory of the CUDA-core forward: Q rows, K rows (padded), V rows, fp32.
constexpr size_t forward_smem(int64_t d, int64_t dv) {
  return sizeof(float) * static_cast<size_t>(kRows * d + kKeys * (d + 1) + kKeys * dv);
}

// C: channels of the output row per lane (cols_for).
template <typename T, int C>
__global__ void __launch_bounds__(kWarps * 32) varlen_forward_kernel(const VarlenParams p) {
  extern __shared__ __align__(16) float smem[];
  const int64_t d = p.d, dv = p.dv, ks = d + 1;  // padded K stride
  float* sq = smem;                 // [kRows][d]
  float* sk = sq + kRows * d;       // [kKeys][d + 1]
  float* sv = sk + kKeys * ks;      // [kKeys][dv]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows, h = blockIdx.y;
  const int64_t kh = h / (p.hq / p.hkv);
  // (cu_seqlens are not checked on the host, which would synchronise: clamp them to the tensors)
  const int64_t total_q = p.cu_seqlens_q[p.batch] < p.nq ? p.cu_seqlens_q[p.batch] : p.nq;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // This warp's rows: sequence, key range, position.
  int64_t r_row[kRowsPerWarp], r_k0[kRowsPerWarp], r_k1[kRowsPerWarp], r_pos[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    r_row[i] = row;
    r_k0[i] = r_k1[i] = 0;
    r_pos[i] = 0;
    if (row < p.nq && row < total_q) {
      const int64_t b = sequence_of(p.cu_seqlens_q, p.batch, row);
      r_k0[i] = p.cu_seqlens_k[b];
      r_k1[i] = p.cu_seqlens_k[b + 1] < p.nk ? p.cu_seqlens_k[b + 1] : p.nk;
      r_pos[i] = p.q_pos[row];
    }
  }
  __shared__ int64_t range[2];
  if (threadIdx.x == 0) cta_key_range(p, row0, kRows, total_q, range);
  for (int64_t i = threadIdx.x; i < kRows * d; i += blockDim.x) {
    const int64_t row = row0 + i / d;
    sq[i] = row < p.nq ? to_f(q[(row * p.hq + h) * d + i % d]) * p.scale : 0.0f;
  }
  __syncthreads();

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][C];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[i][c] = 0.0f;
  }

  for (int64_t t0 = range[0]; t0 < range[1]; t0 += kKeys) {
    const int64_t nt = range[1] - t0 < kKeys ? range[1] - t0 : kKeys;
    __syncthreads();  // the previous tile is consumed
    for (int64_t i = threadIdx.x; i < nt * d; i += blockDim.x) {
      sk[(i / d) * ks + i % d] = to_f(k[((t0 + i / d) * p.hkv + kh) * d + i % d]);
    }
    for (int64_t i = threadIdx.x; i < nt * dv; i += blockDim.x) {
      sv[i] = to_f(v[((t0 + i / dv) * p.hkv + kh) * dv + i % dv]);
    }
    __syncthreads();
    const int64_t key = t0 + lane;
    const int64_t kp = lane < nt ? p.k_pos[key] : 0;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const bool ok = lane < nt && key >= r_k0[i] && key < r_k1[i] &&
                      visible(r_pos[i], kp, p.window_left, p.window_right);
      if (!__any_sync(0xffffffffu, ok)) continue;
      float s = -INFINITY;
      if (ok) {
        const float* qr = sq + (warp * kRowsPerWarp + i) * d;
        const float* kr = sk + lane * ks;
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) dot += qr[c] * kr[c];
        s = p.softcap > 0.0f ? p.softcap * tanhf(dot / p.softcap) : dot;
      }
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m[i], mx);
      const float alpha = m[i] == -INFINITY ? 0.0f : expf(m[i] - m_new);
      const float pj = ok ? expf(s - m_new) : 0.0f;
      float sum = pj;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[i][c] *= alpha;
      for (int j = 0; j < nt; ++j) {
        const float pb = __shfl_sync(0xffffffffu, pj, j);
        if (pb == 0.0f) continue;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int64_t col = lane + 32 * c;
          if (col < dv) acc[i][c] += pb * sv[j * dv + col];
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = r_row[i];
    if (row >= p.nq) continue;
    const float inv = seen(l[i]) ? 1.0f / l[i] : 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t col = lane + 32 * c;
      if (col < dv) out[(row * p.hq + h) * dv + col] = from_f<T>(acc[i][c] * inv);
    }
    if (lane == 0) p.lse[row * p.hq + h] = seen(l[i]) ? m[i] + logf(l[i]) : -INFINITY;
  }
}

// ---- Tensor-core kernels: a CTA's 64 entries against tiles of 64 of the other side -------------
// The forward and the dQ kernel own 64 packed query rows and walk the key tiles of their rows'
// sequences; the dK/dV kernel owns 64 keys and walks the query tiles of its keys' sequences.
// PairWalk does the bookkeeping for both: each owned entry's sequence (binary search in its
// cu_seqlens) and position in shared memory, the other side's range (the entries of the owned
// sequences), and per candidate tile its entries' sequences and positions, the tile skipped when
// the bounds of both sides rule out every pair and run without the mask when every pair is visible.
// Positions need not increase (every pair is masked individually).

// The sequences and positions of a set of rows (or keys): their bounds over the entries inside a
// sequence, and how many are outside every one.
struct SeqPosBounds {
  int32_t seq_lo, seq_hi, outside;
  int64_t pos_lo, pos_hi;
};

__device__ __forceinline__ SeqPosBounds merge(const SeqPosBounds& a, const SeqPosBounds& b) {
  return {a.seq_lo < b.seq_lo ? a.seq_lo : b.seq_lo, a.seq_hi > b.seq_hi ? a.seq_hi : b.seq_hi,
          a.outside + b.outside, a.pos_lo < b.pos_lo ? a.pos_lo : b.pos_lo,
          a.pos_hi > b.pos_hi ? a.pos_hi : b.pos_hi};
}

// The bounds of the warp's 32 entries (each lane's one), in every lane.
__device__ __forceinline__ SeqPosBounds warp_bounds(bool in, int32_t seq, int64_t pos) {
  SeqPosBounds r{in ? seq : INT32_MAX, in ? seq : INT32_MIN, in ? 0 : 1, in ? pos : INT64_MAX,
                 in ? pos : INT64_MIN};
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const SeqPosBounds o{__shfl_xor_sync(0xffffffffu, r.seq_lo, off), __shfl_xor_sync(0xffffffffu, r.seq_hi, off),
                         __shfl_xor_sync(0xffffffffu, r.outside, off), __shfl_xor_sync(0xffffffffu, r.pos_lo, off),
                         __shfl_xor_sync(0xffffffffu, r.pos_hi, off)};
    r = merge(r, o);
  }
  return r;
}

constexpr int kWalk = 64;  // entries per CTA and per tile of the other side

// PairWalk's shared arrays (in the kernel's dynamic shared memory).
struct WalkShared {
  int64_t own_pos[kWalk];
  int64_t oth_pos[kWalk];
  int32_t own_seq[kWalk];   // -1 outside every sequence
  int32_t oth_seq[kWalk];   // -2 past the range
  int32_t seq_cu[kWalk];    // where the owned sequences start on the other side (up to kWalk of them)
  SeqPosBounds part[2][2];  // [own, other][warp 0, 1]
};

// One side of the attention: its cu_seqlens ([batch + 1]), positions and entry count.
struct Side {
  const int32_t* cu;
  const int64_t* pos;
  int64_t n;
};

template <bool kOwnQueries>
struct PairWalk {
  WalkShared* sh;
  Side oth;
  int64_t left, right;  // the window
  SeqPosBounds own;
  bool own_one_sequence;
  int n_seq;                // the owned entries' sequences seq_lo..seq_hi (empty ones included)
  const int32_t* oth_cu;    // their starts on the other side: shared memory, or global when many
  int64_t lo = 0, hi = 0;   // the other side's range

  // Every thread (the first kWalk fill the entries); ends with a barrier.
  __device__ PairWalk(WalkShared* s, const Side& own_side, const Side& other, int64_t batch, int64_t own0,
                      int64_t window_left, int64_t window_right)
      : sh(s), oth(other), left(window_left), right(window_right) {
    const int64_t total = own_side.cu[batch] < own_side.n ? own_side.cu[batch] : own_side.n;
    if (threadIdx.x < kWalk) {
      const int i = static_cast<int>(threadIdx.x);
      const int64_t e = own0 + i;
      const bool in = e < total;
      sh->own_seq[i] = in ? static_cast<int32_t>(sequence_of(own_side.cu, batch, e)) : -1;
      sh->own_pos[i] = in ? own_side.pos[e] : 0;
      const SeqPosBounds b = warp_bounds(in, sh->own_seq[i], sh->own_pos[i]);
      if ((i & 31) == 0) sh->part[0][i >> 5] = b;
    }
    __syncthreads();
    own = merge(sh->part[0][0], sh->part[0][1]);
    own_one_sequence = own.outside == 0 && own.seq_lo == own.seq_hi;
    n_seq = own.seq_lo <= own.seq_hi ? own.seq_hi - own.seq_lo + 1 : 0;
    if (n_seq > 0) {
      lo = oth.cu[own.seq_lo];
      hi = oth.cu[own.seq_hi + 1] < oth.n ? oth.cu[own.seq_hi + 1] : oth.n;
    }
    // (64 entries may span more sequences when some are empty on this side: then from global memory)
    oth_cu = n_seq <= kWalk ? sh->seq_cu : oth.cu + own.seq_lo;
    if (n_seq <= kWalk && static_cast<int>(threadIdx.x) < n_seq) sh->seq_cu[threadIdx.x] = oth.cu[own.seq_lo + threadIdx.x];
    __syncthreads();
  }

  // The first tile from `from` on that the bounds do not rule out (hi: none), with its entries'
  // sequences and positions in shared memory; `whole`: every pair of it visible (no mask). Every
  // thread, after a barrier that ends the reads of the previous tile's entries.
  __device__ int64_t next_tile(int64_t from, bool& whole) {
    for (int64_t t0 = from; t0 < hi; t0 += kWalk) {
      const int nt = static_cast<int>(hi - t0 < kWalk ? hi - t0 : kWalk);
      if (threadIdx.x < kWalk) {
        const int j = static_cast<int>(threadIdx.x);
        const bool in = j < nt;
        // the last of the owned sequences that starts at or before the entry
        const int64_t sq = in ? sequence_of(oth_cu, n_seq - 1, t0 + j) : 0;
        sh->oth_seq[j] = in ? own.seq_lo + static_cast<int32_t>(sq) : -2;
        sh->oth_pos[j] = in ? oth.pos[t0 + j] : 0;
        const SeqPosBounds b = warp_bounds(in, sh->oth_seq[j], sh->oth_pos[j]);
        if ((j & 31) == 0) sh->part[1][j >> 5] = b;
      }
      __syncthreads();
      const SeqPosBounds other = merge(sh->part[1][0], sh->part[1][1]);
      const SeqPosBounds& q = kOwnQueries ? own : other;
      const SeqPosBounds& k = kOwnQueries ? other : own;
      if (other.seq_hi < own.seq_lo || other.seq_lo > own.seq_hi || (right >= 0 && k.pos_lo > q.pos_hi + right) ||
          (left >= 0 && k.pos_hi < q.pos_lo - left)) {
        __syncthreads();  // the next candidate rewrites the entries
        continue;
      }
      whole = own_one_sequence && other.outside == 0 && other.seq_lo == other.seq_hi && other.seq_lo == own.seq_lo &&
              (right < 0 || k.pos_hi <= q.pos_lo + right) && (left < 0 || k.pos_lo >= q.pos_hi - left);
      return t0;
    }
    return hi;
  }

  // Owned entry i and entry j of the current tile.
  __device__ bool pair_visible(int i, int j) const {
    const int64_t qp = kOwnQueries ? sh->own_pos[i] : sh->oth_pos[j];
    const int64_t kp = kOwnQueries ? sh->oth_pos[j] : sh->own_pos[i];
    return sh->own_seq[i] == sh->oth_seq[j] && visible(qp, kp, left, right);
  }
};

// ---- Tensor-core forward (common/tc_attention.cuh does the arithmetic) ----------------------------
template <int D, int DV>
struct VarlenTcSmem {
  using S = cuda::tc::Smem<D, DV>;
  static constexpr size_t kWalkAt = S::kExtra;
  static constexpr size_t kBytes = kWalkAt + sizeof(WalkShared);
};

// (min blocks 1: with the bare thread count ptxas aimed at 128 registers for D = 64 and spilled 20
// bytes in the key loop; now 148-149 registers, no spill, three CTAs per SM by registers.)
// Queries and keys of D channels, values of DV.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(cuda::tc::kWarps * 32, 1) varlen_forward_tc_kernel(const VarlenParams p) {
  // The tensor-core tile sizes, named here: this file's own kRows / kKeys (the CUDA-core kernel's,
  // 16 and 32) would shadow the ones a `using namespace cuda::tc` brings in.
  namespace tc = cuda::tc;
  namespace ptx = cuda::ptx;
  using S = tc::Smem<D, DV>;
  constexpr int kRows = tc::kRows, kKeys = tc::kKeys;
  static_assert(kRows == kWalk && kKeys == kWalk, "a CTA's rows and a key tile: PairWalk's entries");
  extern __shared__ __align__(128) unsigned char tc_smem[];
  T* sq = reinterpret_cast<T*>(tc_smem + S::kQ);
  T* sk = reinterpret_cast<T*>(tc_smem + S::kK);
  T* sv = reinterpret_cast<T*>(tc_smem + S::kV);
  auto* walk_sh = reinterpret_cast<WalkShared*>(tc_smem + VarlenTcSmem<D, DV>::kWalkAt);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows, h = blockIdx.y;
  const int64_t kh = h / (p.hq / p.hkv);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Q (zeros past nq) lands while the walk finds the rows' sequences.
  const int valid_q = static_cast<int>(p.nq - row0 < kRows ? p.nq - row0 : kRows);
  tc::load_rows_async<T, D>(sq, S::kLd, kRows, valid_q, [&](int i) { return q + ((row0 + i) * p.hq + h) * D; });
  ptx::cp_async_commit();
  PairWalk<true> walk(walk_sh, Side{p.cu_seqlens_q, p.q_pos, p.nq}, Side{p.cu_seqlens_k, p.k_pos, p.nk}, p.batch,
                      row0, p.window_left, p.window_right);
  ptx::cp_async_wait<0>();
  __syncthreads();
  tc::WarpTile<T, D, false, DV> tile(tc_smem);
  const auto visible_pair = [&](int i, int j) { return walk.pair_visible(i, j); };
  const auto tile_keys = [&](int64_t t0) { return static_cast<int>(walk.hi - t0 < kKeys ? walk.hi - t0 : kKeys); };
  const auto issue_k = [&](int64_t t0) {
    tc::load_rows_async<T, D>(sk, S::kLd, kKeys, tile_keys(t0), [=](int j) { return k + ((t0 + j) * p.hkv + kh) * D; });
    ptx::cp_async_commit();
  };
  const auto issue_v = [&](int64_t t0) {
    tc::load_rows_async<T, DV>(sv, S::kLdV, kKeys, tile_keys(t0),
                               [=](int j) { return v + ((t0 + j) * p.hkv + kh) * DV; });
    ptx::cp_async_commit();
  };

  // Pipeline per tile: V(t) lands during the scores of t, K(next) during P V of t.
  bool whole = false;
  int64_t t0 = walk.next_tile(walk.lo, whole);
  if (t0 < walk.hi) issue_k(t0);
  while (t0 < walk.hi) {
    issue_v(t0);
    ptx::cp_async_wait<1>();
    __syncthreads();  // K(t0)
    uint32_t pf[kKeys / 16][4], unused[kKeys / 16][4];  // (P's lo parts: fp32 queries only)
    if (whole) {
      tile.softmax(tc::AllVisible{}, p.scale, p.softcap, pf, unused);
    } else {
      tile.softmax(visible_pair, p.scale, p.softcap, pf, unused);
    }
    ptx::cp_async_wait<0>();
    __syncthreads();  // V(t0); every warp is done with K(t0) and the tile's key data
    bool next_whole = false;
    const int64_t t1 = walk.next_tile(t0 + kKeys, next_whole);
    if (t1 < walk.hi) issue_k(t1);
    tile.accumulate(pf);
    __syncthreads();  // every warp is done with V(t0)
    t0 = t1;
    whole = next_whole;
  }

  T* out = static_cast<T*>(p.out);
  tile.template finish<T>(
      [&](int i) -> T* { return row0 + i < p.nq ? out + ((row0 + i) * p.hq + h) * DV : nullptr; },
      [&](int i, float lse) {
        if (row0 + i < p.nq) p.lse[(row0 + i) * p.hq + h] = lse;
      });
}

// ---- Backward ----------------------------------------------------------------------------------
// Lane l holds channels l, l + 32, ... (C of them) of a row; warp_dot reduces over the warp.

template <typename T, int C>
__device__ __forceinline__ void load_cols(const T* row, int64_t n, int lane, float (&out)[C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int64_t col = lane + 32 * c;
    out[c] = col < n ? to_f(row[col]) : 0.0f;
  }
}

template <int C>
__device__ __forceinline__ float warp_dot(const float (&a)[C], const float (&b)[C]) {
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < C; ++c) s += a[c] * b[c];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

template <typename T, int C>
__device__ __forceinline__ void store_cols(T* row, int64_t n, int lane, const float (&v)[C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int64_t col = lane + 32 * c;
    if (col < n) row[col] = from_f<T>(v[c]);
  }
}

// delta[i, h] = dO[i, h] . O[i, h] - dlse[i, h] (the lse's gradient folded in: ds = p (dp - delta)):
// one warp per (query row, head).
template <typename T, int C>
__global__ void varlen_delta_kernel(const VarlenBwdParams p) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= p.fwd.nq * p.fwd.hq) return;
  float o[C], g[C];
  load_cols(static_cast<const T*>(p.out) + w * p.fwd.dv, p.fwd.dv, lane, o);
  load_cols(static_cast<const T*>(p.dout) + w * p.fwd.dv, p.fwd.dv, lane, g);
  const float d = warp_dot(o, g);
  if (lane == 0) p.delta[w] = p.dlse != nullptr ? d - p.dlse[w] : d;
}

// ds for one visible pair (query row i, head h) x (key j): p = exp(s - lse), dp = dO . v.
__device__ __forceinline__ float pair_ds(const VarlenBwdParams& p, int64_t ih, float s, float dp,
                                         float& prob) {
  float dcap = 1.0f;  // soft-capping: s -> c tanh(s / c), ds -> ds (1 - tanh^2)
  if (p.fwd.softcap > 0.0f) {
    const float th = tanhf(s / p.fwd.softcap);
    s = p.fwd.softcap * th;
    dcap = 1.0f - th * th;
  }
  prob = expf(s - p.lse[ih]);
  return prob * (dp - p.delta[ih]) * dcap;
}

// dK[j, kh], dV[j, kh]: one warp per (key, kv head), over the visible queries of the key's sequence
// and the kv head's query heads.
template <typename T, int C>
__global__ void varlen_dkdv_kernel(const VarlenBwdParams p) {
  const VarlenParams& f = p.fwd;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= f.nk * f.hkv) return;
  const int64_t j = w / f.hkv, kh = w % f.hkv, group = f.hq / f.hkv;
  const int64_t total_k = f.cu_seqlens_k[f.batch] < f.nk ? f.cu_seqlens_k[f.batch] : f.nk;
  if (j >= total_k) return;  // outside every sequence: left zero
  const int64_t b = sequence_of(f.cu_seqlens_k, f.batch, j);
  const int64_t q0 = f.cu_seqlens_q[b];
  const int64_t q1 = f.cu_seqlens_q[b + 1] < f.nq ? f.cu_seqlens_q[b + 1] : f.nq;
  const int64_t kp = f.k_pos[j];
  float kr[C], vr[C], dk[C] = {}, dv[C] = {};
  load_cols(static_cast<const T*>(f.k) + (j * f.hkv + kh) * f.d, f.d, lane, kr);
  load_cols(static_cast<const T*>(f.v) + (j * f.hkv + kh) * f.dv, f.dv, lane, vr);
  for (int64_t i = q0; i < q1; ++i) {
    if (!visible(f.q_pos[i], kp, f.window_left, f.window_right)) continue;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t ih = i * f.hq + kh * group + g;
      float qr[C], dor[C];
      load_cols(static_cast<const T*>(f.q) + ih * f.d, f.d, lane, qr);
      load_cols(static_cast<const T*>(p.dout) + ih * f.dv, f.dv, lane, dor);
      const float s = warp_dot(qr, kr) * f.scale, dp = warp_dot(dor, vr);
      float prob;
      const float ds = pair_ds(p, ih, s, dp, prob);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        dk[c] += f.scale * ds * qr[c];
        dv[c] += prob * dor[c];
      }
    }
  }
  store_cols(static_cast<T*>(p.dk) + (j * f.hkv + kh) * f.d, f.d, lane, dk);
  store_cols(static_cast<T*>(p.dv) + (j * f.hkv + kh) * f.dv, f.dv, lane, dv);
}

// dQ[i, h]: one warp per (query row, head), over the visible keys of its sequence.
template <typename T, int C>
__global__ void varlen_dq_kernel(const VarlenBwdParams p) {
  const VarlenParams& f = p.fwd;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= f.nq * f.hq) return;
  const int64_t i = w / f.hq, h = w % f.hq, kh = h / (f.hq / f.hkv);
  const int64_t total_q = f.cu_seqlens_q[f.batch] < f.nq ? f.cu_seqlens_q[f.batch] : f.nq;
  if (i >= total_q) return;  // outside every sequence: left zero
  const int64_t b = sequence_of(f.cu_seqlens_q, f.batch, i);
  const int64_t k0 = f.cu_seqlens_k[b];
  const int64_t k1 = f.cu_seqlens_k[b + 1] < f.nk ? f.cu_seqlens_k[b + 1] : f.nk;
  const int64_t qp = f.q_pos[i];
  float qr[C], dor[C], dq[C] = {};
  load_cols(static_cast<const T*>(f.q) + w * f.d, f.d, lane, qr);
  load_cols(static_cast<const T*>(p.dout) + w * f.dv, f.dv, lane, dor);
  for (int64_t j = k0; j < k1; ++j) {
    if (!visible(qp, f.k_pos[j], f.window_left, f.window_right)) continue;
    float kr[C], vr[C];
    load_cols(static_cast<const T*>(f.k) + (j * f.hkv + kh) * f.d, f.d, lane, kr);
    load_cols(static_cast<const T*>(f.v) + (j * f.hkv + kh) * f.dv, f.dv, lane, vr);
    const float s = warp_dot(qr, kr) * f.scale, dp = warp_dot(dor, vr);
    float prob;
    const float ds = pair_ds(p, w, s, dp, prob);
#pragma unroll
    for (int c = 0; c < C; ++c) dq[c] += f.scale * ds * kr[c];
  }
  store_cols(static_cast<T*>(p.dq) + w * f.d, f.d, lane, dq);
}

// ---- Tensor-core backward (fp16/bf16, the shapes of cuda::tc::with_dims) ------------------------
// FlashAttention-2's backward in two deterministic kernels (no atomics), both recomputing P from
// the saved lse: the dK/dV kernel owns 64 keys of a kv head (warp w its keys 16w..16w+15) and walks
// the query tiles of their sequences for every query head of the group: S^T = K Q^T, dP^T = V dO^T,
// P^T and dS^T = P^T (dP^T - delta) in registers, dV += P^T dO, dK += dS^T Q; the dQ kernel owns 64
// query rows of a head (as the forward) and walks their key tiles: S = Q K^T, dP = dO V^T, dS,
// dQ += dS K. P and dS are rounded to the input dtype for their products (as FlashAttention);
// every product accumulates in fp32. The owned tiles stay in shared memory (A fragments read per
// product: registers hold the accumulators); PairWalk skips tiles and masks as in the forward. At
// head dim 256 dK's and dV's accumulators do not fit in a lane's registers together: the dK/dV
// kernel runs twice, once for each (S^T recomputed: one product more of the five).
template <int D, int DV>
struct VarlenBwdSmem {
  static constexpr int kLd = D + cuda::tc::kPad, kLdV = DV + cuda::tc::kPad;
  static constexpr size_t kTile = size_t(kWalk) * kLd * 2;    // 64 rows of D 16-bit values
  static constexpr size_t kTileV = size_t(kWalk) * kLdV * 2;  // and of DV
  // the owned entries' (dQ: Q, dO; dK/dV: K, V) at 0 and kTile, the current tile's other side's at
  // kSide and kSide + kTile (rows of D, then of DV)
  static constexpr size_t kSide = kTile + kTileV;
  static constexpr size_t kWalkAt = 2 * kSide;
  static constexpr size_t kStats = kWalkAt + (sizeof(WalkShared) + 127) / 128 * 128;
  static constexpr size_t kBytes = kStats + 2 * kWalk * sizeof(float);  // dK/dV: the queries' lse, delta
  static_assert(kTile % 128 == 0 && kTileV % 128 == 0, "tiles stay 128-byte aligned");
  // dK's and dV's accumulators (D / 2 + DV / 2 registers a lane) too many together: the dK/dV
  // kernel runs twice, once for each (at 256)
  static constexpr bool kApart = D / 2 + DV / 2 > 160;
};

// One score's probability and gradient, in place: s (raw) -> p = exp(x - lse) with x = scale s
// (soft-capped: c tanh(x / c)), dp -> ds = p (dp - delta) (times 1 - tanh^2); both 0 when not
// visible. lse2 = lse log2(e).
__device__ __forceinline__ void p_and_ds(float& s, float& dp, bool vis, float scale, float softcap, float lse2,
                                         float delta) {
  constexpr float kLog2e = 1.4426950408889634f;
  float x = s * scale, dcap = 1.0f;
  if (softcap > 0.0f) {
    const float th = tanhf(x / softcap);
    x = softcap * th;
    dcap = 1.0f - th * th;
  }
  const float pr = vis ? exp2f(x * kLog2e - lse2) : 0.0f;
  dp = vis ? pr * (dp - delta) * dcap : 0.0f;
  s = pr;
}

// Rows row0.. of the 16-bit tensor base (row r at base + (r * heads + head) * D) into a shared tile.
template <typename T, int D>
__device__ __forceinline__ void issue_rows(T* dst, const T* base, int64_t row0, int64_t valid, int64_t heads,
                                           int64_t head) {
  const int n = static_cast<int>(valid < kWalk ? valid : kWalk);
  cuda::tc::load_rows_async<T, D>(dst, D + cuda::tc::kPad, kWalk, n,
                                  [=](int i) { return base + ((row0 + i) * heads + head) * D; });
  cuda::ptx::cp_async_commit();
}

// A warp's 16 x D accumulator rows (owned entries warp * 16 + lane / 4 and + 8) times `factor`
// into out (row r at out + (r * heads + head) * D), for the entries inside a sequence.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float factor, T* out, int64_t row0,
                                           int64_t heads, int64_t head, const WalkShared* sh) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = warp * 16 + (lane >> 2) + 8 * hh;
    if (sh->own_seq[i] < 0) continue;  // outside every sequence (or past the end): left as it is
    T* row = out + ((row0 + i) * heads + head) * D;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      const int c = nb * 8 + 2 * (lane & 3);
      row[c] = from_f<T>(acc[nb][2 * hh] * factor);
      row[c + 1] = from_f<T>(acc[nb][2 * hh + 1] * factor);
    }
  }
}

// kDK / kDV: the gradients the kernel computes (both but at head dim 256: one per launch).
template <typename T, int D, int DV, bool kDK, bool kDV>
__global__ void __launch_bounds__(cuda::tc::kWarps * 32, 1) varlen_dkdv_tc_kernel(const VarlenBwdParams bp) {
  namespace tc = cuda::tc;
  namespace ptx = cuda::ptx;
  using L = VarlenBwdSmem<D, DV>;
  // Queries per pass: the accumulators take kAcc registers a lane (128 at D = DV = 128), so the
  // tile's 64 queries go in passes of 32 (the scores of a pass: 32 registers for S^T and dP^T) or,
  // at 192 / 128 (160), of 16; a loop kept rolled (unrolled, ptxas interleaves the passes: at 128
  // 255 registers and a 32-byte spill; rolled 238, none).
  constexpr int kAcc = (kDK ? D / 2 : 0) + (kDV ? DV / 2 : 0);
  constexpr int kPass = kAcc <= 64 ? kWalk : kAcc <= 128 ? 32 : 16;
  constexpr int kLd = L::kLd, kLdV = L::kLdV, kNB = kPass / 8;
  static_assert(tc::kWarps * 16 == kWalk && kWalk % kPass == 0, "a warp's 16 keys; whole passes");
  static_assert((kDK || kDV) && !(kDK && kDV && L::kApart), "a gradient to compute; both where they fit");
  const VarlenParams& p = bp.fwd;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  T* sk = reinterpret_cast<T*>(tc_smem);
  T* sv = reinterpret_cast<T*>(tc_smem + L::kTile);
  T* sq = reinterpret_cast<T*>(tc_smem + L::kSide);
  T* sdo = reinterpret_cast<T*>(tc_smem + L::kSide + L::kTile);
  auto* walk_sh = reinterpret_cast<WalkShared*>(tc_smem + L::kWalkAt);
  float* s_lse2 = reinterpret_cast<float*>(tc_smem + L::kStats);
  float* s_delta = s_lse2 + kWalk;

  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kWalk, kh = blockIdx.y, group = p.hq / p.hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  issue_rows<T, D>(sk, static_cast<const T*>(p.k), key0, p.nk - key0, p.hkv, kh);
  if constexpr (kDK) issue_rows<T, DV>(sv, static_cast<const T*>(p.v), key0, p.nk - key0, p.hkv, kh);
  PairWalk<false> walk(walk_sh, Side{p.cu_seqlens_k, p.k_pos, p.nk}, Side{p.cu_seqlens_q, p.q_pos, p.nq}, p.batch,
                       key0, p.window_left, p.window_right);
  const T* kw = sk + warp * 16 * kLd;  // the warp's keys and values
  const T* vw = sv + warp * 16 * kLdV;
  float dk[D / 8][4] = {}, dv[DV / 8][4] = {};  // (the one not computed: dead, not allocated)

  bool whole = false;
  for (int64_t t0 = walk.next_tile(walk.lo, whole); t0 < walk.hi; t0 = walk.next_tile(t0 + kWalk, whole)) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      issue_rows<T, D>(sq, static_cast<const T*>(p.q), t0, walk.hi - t0, p.hq, h);
      issue_rows<T, DV>(sdo, static_cast<const T*>(bp.dout), t0, walk.hi - t0, p.hq, h);
      if (threadIdx.x < kWalk) {
        const int j = static_cast<int>(threadIdx.x);
        const bool in = t0 + j < walk.hi;
        s_lse2[j] = in ? bp.lse[(t0 + j) * p.hq + h] * 1.4426950408889634f : 0.0f;
        s_delta[j] = in ? bp.delta[(t0 + j) * p.hq + h] : 0.0f;
      }
      ptx::cp_async_wait<0>();
      __syncthreads();  // dO
#pragma unroll 1
      for (int q0 = 0; q0 < kWalk; q0 += kPass) {
        float st[kNB][4] = {}, dpt[kNB][4] = {};  // keys x queries q0..q0 + kPass
        tc::mma_abt<T, D, kNB>(st, kw, sq + q0 * kLd, kLd);
        if constexpr (kDK) tc::mma_abt<T, DV, kNB>(dpt, vw, sdo + q0 * kLdV, kLdV);
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = warp * 16 + (lane >> 2) + 8 * (e >> 1), j = q0 + nb * 8 + 2 * (lane & 3) + (e & 1);
            const bool vis = whole || walk.pair_visible(i, j);
            p_and_ds(st[nb][e], dpt[nb][e], vis, p.scale, p.softcap, s_lse2[j], s_delta[j]);
          }
        }
        uint32_t af[kPass / 16][4];
        if constexpr (kDV) {
          tc::to_a_fragments<T>(st, af);  // P^T
          tc::mma_ab<T, kPass / 16, DV / 8>(dv, af, sdo + q0 * kLdV, kLdV);
        }
        if constexpr (kDK) {
          tc::to_a_fragments<T>(dpt, af);  // dS^T
          tc::mma_ab<T, kPass / 16, D / 8>(dk, af, sq + q0 * kLd, kLd);
        }
      }
      __syncthreads();  // every warp is done with Q, dO and the statistics (and, after the last
                        // head, with the tile's entries: next_tile rewrites them)
    }
  }
  ptx::cp_async_wait<0>();  // (no tile: K and V were issued, nothing waited for them)
  if constexpr (kDK) store_rows<T, D>(dk, p.scale, static_cast<T*>(bp.dk), key0, p.hkv, kh, walk_sh);
  if constexpr (kDV) store_rows<T, DV>(dv, 1.0f, static_cast<T*>(bp.dv), key0, p.hkv, kh, walk_sh);
}

template <typename T, int D, int DV>
__global__ void __launch_bounds__(cuda::tc::kWarps * 32, 1) varlen_dq_tc_kernel(const VarlenBwdParams bp) {
  namespace tc = cuda::tc;
  namespace ptx = cuda::ptx;
  using L = VarlenBwdSmem<D, DV>;
  // Keys per step: the whole 64-key tile up to D = 128 (dQ 64 registers a lane, S and dP 64); past
  // it (dQ 96 or 128) the tile in two steps of 32, a loop kept rolled.
  constexpr int kKeys = D <= 128 ? kWalk : 32;
  constexpr int kLd = L::kLd, kLdV = L::kLdV, kNB = kKeys / 8;
  const VarlenParams& p = bp.fwd;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  T* sq = reinterpret_cast<T*>(tc_smem);
  T* sdo = reinterpret_cast<T*>(tc_smem + L::kTile);
  T* sk = reinterpret_cast<T*>(tc_smem + L::kSide);
  T* sv = reinterpret_cast<T*>(tc_smem + L::kSide + L::kTile);
  auto* walk_sh = reinterpret_cast<WalkShared*>(tc_smem + L::kWalkAt);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kWalk, h = blockIdx.y, kh = h / (p.hq / p.hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  issue_rows<T, D>(sq, static_cast<const T*>(p.q), row0, p.nq - row0, p.hq, h);
  issue_rows<T, DV>(sdo, static_cast<const T*>(bp.dout), row0, p.nq - row0, p.hq, h);
  PairWalk<true> walk(walk_sh, Side{p.cu_seqlens_q, p.q_pos, p.nq}, Side{p.cu_seqlens_k, p.k_pos, p.nk}, p.batch,
                      row0, p.window_left, p.window_right);
  float lse2[2], delta[2];  // the lane's rows
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t r = row0 + warp * 16 + (lane >> 2) + 8 * hh;
    lse2[hh] = r < p.nq ? bp.lse[r * p.hq + h] * 1.4426950408889634f : 0.0f;
    delta[hh] = r < p.nq ? bp.delta[r * p.hq + h] : 0.0f;
  }
  const T* qw = sq + warp * 16 * kLd;  // the warp's rows
  const T* dow = sdo + warp * 16 * kLdV;
  float dq[D / 8][4] = {};

  bool whole = false;
  for (int64_t t0 = walk.next_tile(walk.lo, whole); t0 < walk.hi; t0 = walk.next_tile(t0 + kWalk, whole)) {
    issue_rows<T, D>(sk, static_cast<const T*>(p.k), t0, walk.hi - t0, p.hkv, kh);
    issue_rows<T, DV>(sv, static_cast<const T*>(p.v), t0, walk.hi - t0, p.hkv, kh);
    ptx::cp_async_wait<1>();
    __syncthreads();  // Q, dO (first pass), K
#pragma unroll 1
    for (int k0 = 0; k0 < kWalk; k0 += kKeys) {
      float s[kNB][4] = {}, dp[kNB][4] = {};  // rows x keys k0..k0 + kKeys
      tc::mma_abt<T, D, kNB>(s, qw, sk + k0 * kLd, kLd);
      if (k0 == 0) {  // (uniform)
        ptx::cp_async_wait<0>();
        __syncthreads();  // V
      }
      tc::mma_abt<T, DV, kNB>(dp, dow, sv + k0 * kLdV, kLdV);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = warp * 16 + (lane >> 2) + 8 * (e >> 1), j = k0 + nb * 8 + 2 * (lane & 3) + (e & 1);
          const bool vis = whole || walk.pair_visible(i, j);
          p_and_ds(s[nb][e], dp[nb][e], vis, p.scale, p.softcap, lse2[e >> 1], delta[e >> 1]);
        }
      }
      uint32_t af[kKeys / 16][4];
      tc::to_a_fragments<T>(dp, af);  // dS
      tc::mma_ab<T, kKeys / 16, D / 8>(dq, af, sk + k0 * kLd, kLd);
    }
    __syncthreads();  // every warp is done with K, V and the tile's entries
  }
  ptx::cp_async_wait<0>();  // (no tile: Q and dO were issued, nothing waited for them)
  store_rows<T, D>(dq, p.scale, static_cast<T*>(bp.dq), row0, p.hq, h, walk_sh);
}

// Shared memory of the tensor-core backward at head dims d / dv (d = dv = 64: 39 KiB, 80: 46, 96:
// 54, 128: 70, 256: 134; 192 / 128: 86); 0 for the shapes it does not take.
size_t tc_backward_smem(int64_t d, int64_t dv) {
  return cuda::tc::with_dims(d, dv, size_t{0}, [](auto s) {
    return VarlenBwdSmem<decltype(s)::kD, decltype(s)::kDV>::kBytes;
  });
}

// fp16/bf16 at a tensor-core shape (tc_backward_smem), 16-byte aligned tensors and enough shared
// memory.
template <typename T>
bool use_tensor_core_backward(const VarlenBwdParams& b) {
  const VarlenParams& p = b.fwd;
  const size_t need = tc_backward_smem(p.d, p.dv);
  if (sizeof(T) != 2 || need == 0) return false;
  return cuda::is_aligned(p.q, 16) && cuda::is_aligned(p.k, 16) && cuda::is_aligned(p.v, 16) &&
         cuda::is_aligned(b.dout, 16) && (p.nq + kWalk - 1) / kWalk < (int64_t{1} << 31) &&
         (p.nk + kWalk - 1) / kWalk < (int64_t{1} << 31) && cuda::tc::optin_smem(nullptr) >= need;
}

template <typename T, int D, int DV>
Status launch_backward_tc(const VarlenBwdParams& p, cudaStream_t stream) {
  static bool configured_dkdv[64] = {}, configured_dk[64] = {}, configured_dv[64] = {}, configured_dq[64] = {};
  constexpr size_t kSmem = VarlenBwdSmem<D, DV>::kBytes;
  const auto tiles = [](int64_t n) { return static_cast<unsigned>((n + kWalk - 1) / kWalk); };
  if (p.fwd.nk > 0) {
    const dim3 grid(tiles(p.fwd.nk), static_cast<unsigned>(p.fwd.hkv));
    Status s = Status::ok();
    if constexpr (VarlenBwdSmem<D, DV>::kApart) {  // dV, then dK
      s = cuda::tc::launch(varlen_dkdv_tc_kernel<T, D, DV, false, true>, grid, kSmem, p, stream, configured_dv);
      if (s.is_ok()) {
        s = cuda::tc::launch(varlen_dkdv_tc_kernel<T, D, DV, true, false>, grid, kSmem, p, stream, configured_dk);
      }
    } else {
      s = cuda::tc::launch(varlen_dkdv_tc_kernel<T, D, DV, true, true>, grid, kSmem, p, stream, configured_dkdv);
    }
    if (!s.is_ok()) return s;
  }
  const dim3 grid(tiles(p.fwd.nq), static_cast<unsigned>(p.fwd.hq));
  return cuda::tc::launch(varlen_dq_tc_kernel<T, D, DV>, grid, kSmem, p, stream, configured_dq);
}

template <typename T, int C>
Status launch_backward(const VarlenBwdParams& p, cudaStream_t stream) {
  constexpr int kBlock = 128;  // 4 warps
  const auto blocks = [](int64_t warps) {
    return static_cast<unsigned>((warps * 32 + kBlock - 1) / kBlock);
  };
  varlen_delta_kernel<T, C><<<blocks(p.fwd.nq * p.fwd.hq), kBlock, 0, stream>>>(p);
  if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  if constexpr (sizeof(T) == 2) {
    if (use_tensor_core_backward<T>(p)) {
      const Status none = Status::invalid("varlen_attention_backward: no tensor-core shape");
      return cuda::tc::with_dims(p.fwd.d, p.fwd.dv, none, [&](auto s) {
        return launch_backward_tc<T, decltype(s)::kD, decltype(s)::kDV>(p, stream);
      });
    }
  }
  if (p.fwd.nk > 0) {
    varlen_dkdv_kernel<T, C><<<blocks(p.fwd.nk * p.fwd.hkv), kBlock, 0, stream>>>(p);
    if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  }
  varlen_dq_kernel<T, C><<<blocks(p.fwd.nq * p.fwd.hq), kBlock, 0, stream>>>(p);
  return cuda::last_launch_status();
}

template <typename T>
Status launch_backward(const VarlenBwdParams& p, cudaStream_t stream) {
  return cols_for(p.fwd.d, p.fwd.dv) == 4 ? launch_backward<T, 4>(p, stream) : launch_backward<T, 8>(p, stream);
}

template <typename T, int D, int DV>
Status launch_tc(const VarlenParams& p, cudaStream_t stream) {
  static bool configured[64] = {};
  const dim3 grid(static_cast<unsigned>((p.nq + cuda::tc::kRows - 1) / cuda::tc::kRows),
                  static_cast<unsigned>(p.hq));
  return cuda::tc::launch(varlen_forward_tc_kernel<T, D, DV>, grid, VarlenTcSmem<D, DV>::kBytes, p, stream,
                          configured);
}

// Shared memory of the tensor-core forward at head dims d / dv (d = dv = 64: 28 KiB, 80: 34, 96: 40,
// 128: 52, 256: 100; 192 / 128: 67); 0 for the shapes it does not take.
size_t tc_forward_smem(int64_t d, int64_t dv) {
  return cuda::tc::with_dims(d, dv, size_t{0}, [](auto s) {
    return VarlenTcSmem<decltype(s)::kD, decltype(s)::kDV>::kBytes;
  });
}

// fp16/bf16 at a tensor-core shape (tc_forward_smem), 16-byte aligned tensors and enough shared
// memory: the tensor-core kernel.
template <typename T>
bool use_tensor_cores(const VarlenParams& p) {
  const size_t need = tc_forward_smem(p.d, p.dv);
  if (sizeof(T) != 2 || need == 0) return false;
  return cuda::is_aligned(p.q, 16) && cuda::is_aligned(p.k, 16) && cuda::is_aligned(p.v, 16) &&
         (p.nq + cuda::tc::kRows - 1) / cuda::tc::kRows < (int64_t{1} << 31) &&
         cuda::tc::optin_smem(nullptr) >= need;
}

template <typename T>
Status launch(const VarlenParams& p, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (use_tensor_cores<T>(p)) {
      const Status none = Status::invalid("varlen_attention: no tensor-core shape");
      return cuda::tc::with_dims(p.d, p.dv, none, [&](auto s) {
        return launch_tc<T, decltype(s)::kD, decltype(s)::kDV>(p, stream);
      });
    }
  }
  const dim3 grid(static_cast<unsigned>((p.nq + kRows - 1) / kRows), static_cast<unsigned>(p.hq));
  const size_t smem = forward_smem(p.d, p.dv);
  if (cols_for(p.d, p.dv) == 4) {  // (head dims <= 128: at most 41 KiB, no opt-in)
    varlen_forward_kernel<T, 4><<<grid, kWarps * 32, smem, stream>>>(p);
    return cuda::last_launch_status();
  }
  // Beyond 128 up to 80 KiB: opted in to the most this instantiation takes.
  static bool configured[64] = {};
  if (Status s = cuda::tc::opt_in(varlen_forward_kernel<T, 8>, forward_smem(kMaxDim, kMaxDim), configured);
      !s.is_ok()) {
    return s;
  }
  varlen_forward_kernel<T, 8><<<grid, kWarps * 32, smem, stream>>>(p);
  return cuda::last_launch_status();
}

}  // namespace

bool varlen_attention_cuda_supported(int64_t d, int64_t dv, int64_t nq, int64_t hq) {
  return d <= kMaxDim && dv <= kMaxDim && (nq + kRows - 1) / kRows < (int64_t{1} << 31) && hq <= 65535;
}

Status varlen_attention_cuda(const VarlenParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (!varlen_attention_cuda_supported(p.d, p.dv, p.nq, p.hq)) {
    return Status::unsupported("varlen_attention: the CUDA kernel takes head dims up to 256");
  }
  if (p.nq == 0) return Status::ok();
  const auto st = static_cast<cudaStream_t>(stream);
  FL_CUDA_BY_FLOAT_DTYPE(launch, p, st, "varlen_attention: dtype must be float32, float16 or bfloat16")
}

Status varlen_attention_backward_cuda(const VarlenBwdParams& p, void* stream) {
  // (not validate(p.fwd): a backward call leaves the forward's output pointers unset)
  if (Status s = validate_backward(p); !s.is_ok()) return s;
  if (!varlen_attention_cuda_supported(p.fwd.d, p.fwd.dv, p.fwd.nq, p.fwd.hq)) {
    return Status::unsupported("varlen_attention_backward: the CUDA kernel takes head dims up to 256");
  }
  if (p.fwd.nq == 0) return Status::ok();
  if (p.delta == nullptr) return Status::invalid("varlen_attention_backward: null workspace (delta)");
  if (p.fwd.nq * p.fwd.hq * 32 >= (int64_t{1} << 40)) return Status::unsupported("varlen_attention_backward: too large");
  const auto st = static_cast<cudaStream_t>(stream);
  switch (p.fwd.dtype) {  // (the dtype lives in p.fwd)
    case DType::kFloat32:
      return launch_backward<float>(p, st);
    case DType::kFloat16:
      return launch_backward<__half>(p, st);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(p, st);
    default:
      return Status::invalid("varlen_attention_backward: dtype must be float32, float16 or bfloat16");
  }
}

}  // namespace fastlayers::skip
