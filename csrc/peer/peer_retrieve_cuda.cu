// SPDX-License-Identifier: Apache-2.0
// CUDA product-key retrieval (sm80+). First version, written for correctness; its tests passed on
// an H200 (dd55068).
// Semantics: peer.h (RetrieveParams) and python/fastlayers/reference/peer.py (peer_retrieve).
//
// One CTA per (block of up to kTokens tokens, head), 256 threads:
//   1. The block's queries go to shared memory as fp32.
//   2. Scores: thread i scores keys i, i + 256, ... of both halves for every token of the block (the
//      key panel value is loaded once per key and dimension and feeds kTokens FMAs; the panels are
//      [half, 32] with lanes over keys, so a warp's loads are one 128-byte line).
//      The [tokens, 2, keys] score tile lives in shared memory only.
//   3. Per-half top-kh: warp w takes (token w / 2, half w % 2) and selects kh times the next score in
//      the order (score descending, index ascending) after the previous pick: no flags and no
//      sorting, each round one pass over the row and one warp reduction. NaN scores rank as -inf,
//      so the kh indices are always valid.
//   4. Merge: warp b takes token b and selects topk times the best head of the kh sorted rows
//      s1[a] + s2[next[a]] (lower row on ties: the lower candidate a * kh + b, as the CPU kernel).
//   5. Gates: softmax over the topk selected scores (or ReLU of each), fp32, rounded once.
// Shared memory per token: (2 * keys_padded + 2 * kh + 2 * topk) * 4 + (3 * kh + 2 * topk) * 4 bytes
// (+ dim_key * 4 for the query); the launcher picks the largest token block that fits in 48 KiB.
// The score tile is a small GEMM ([tokens, half] x [half, keys]); a tensor-core version that keeps
// many tokens per CTA is the next step once this one has been measured.
#include <cmath>

#include "common/cuda_utils.cuh"
#include "peer/peer.h"

namespace fastlayers::peer {
namespace {

using cuda::to_f;

constexpr int kThreads = 256;
constexpr int kMaxTokens = 4;  // tokens per CTA: 2 * kMaxTokens warps select, one per (token, half)
constexpr size_t kSmemLimit = 48 * 1024;

struct Layout {
  int64_t kp, kh, topk, dk;
  __host__ __device__ size_t per_token_floats() const { return 2 * kp + 2 * kh + topk + dk; }
  __host__ __device__ size_t per_token_ints() const { return 3 * kh + 2 * topk; }  // int32 slots
  __host__ __device__ size_t bytes(int tokens) const {
    return static_cast<size_t>(tokens) * (per_token_floats() * 4 + per_token_ints() * 4);
  }
};

// Shared memory of token b of the block.
struct TokenSmem {
  float* q;       // [dk]
  float* scores;  // [2, kp]
  float* v;       // [2, kh]: the two sorted half lists
  float* sel;     // [topk]
  int32_t* i;     // [2, kh]
  int32_t* next;  // [kh]
  int32_t* pick;  // [2 * topk]: (row a, column b) of each selected candidate
  __device__ TokenSmem(unsigned char* base, const Layout& L, int b, int tokens) {
    float* f = reinterpret_cast<float*>(base) + static_cast<size_t>(b) * L.per_token_floats();
    q = f;
    scores = q + L.dk;
    v = scores + 2 * L.kp;
    sel = v + 2 * L.kh;
    int32_t* n = reinterpret_cast<int32_t*>(reinterpret_cast<float*>(base) +
                                            static_cast<size_t>(tokens) * L.per_token_floats()) +
                 static_cast<size_t>(b) * L.per_token_ints();
    i = n;
    next = i + 2 * L.kh;
    pick = next + L.kh;
  }
};

__device__ __forceinline__ float rank_value(float v) { return v != v ? -INFINITY : v; }

// (v1, i1) comes before (v2, i2): higher rank value, then lower index.
__device__ __forceinline__ bool before(float v1, int64_t i1, float v2, int64_t i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// Warp-wide best (rank value, index) among the lanes' candidates; index -1 = none.
__device__ __forceinline__ void warp_best(float& v, int64_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (oi >= 0 && (i < 0 || before(ov, oi, v, i))) {
      v = ov;
      i = oi;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) retrieve_kernel(const RetrieveParams p, Layout L,
                                                            int block_tokens) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t h = blockIdx.y, t0 = static_cast<int64_t>(blockIdx.x) * block_tokens;
  const int nt = static_cast<int>(p.tokens - t0 < block_tokens ? p.tokens - t0 : block_tokens);
  const int64_t half = L.dk / 2, nk = p.num_keys, kh = L.kh, topk = L.topk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* queries = static_cast<const T*>(p.queries);

  // 1. Queries.
  for (int b = 0; b < nt; ++b) {
    const TokenSmem s(smem, L, b, block_tokens);
    for (int64_t d = threadIdx.x; d < L.dk; d += blockDim.x) {
      s.q[d] = to_f(queries[((t0 + b) * p.heads + h) * L.dk + d]);
    }
  }
  __syncthreads();

  // 2. Scores of both halves for every token of the block.
  const float* q[kMaxTokens];
  float* scores[kMaxTokens];
#pragma unroll
  for (int b = 0; b < kMaxTokens; ++b) {
    const TokenSmem s(smem, L, b < nt ? b : 0, block_tokens);
    q[b] = s.q;
    scores[b] = s.scores;
  }
  for (int64_t k = threadIdx.x; k < L.kp; k += blockDim.x) {
    for (int part = 0; part < 2; ++part) {
      const float* panel = p.keys_t + ((h * 2 + part) * (L.kp / kRetrieveKeyTile) +
                                       k / kRetrieveKeyTile) * half * kRetrieveKeyTile +
                           k % kRetrieveKeyTile;
      float acc[kMaxTokens] = {};
      for (int64_t d = 0; d < half; ++d) {
        const float kv = panel[d * kRetrieveKeyTile];
#pragma unroll
        for (int b = 0; b < kMaxTokens; ++b) acc[b] += q[b][part * half + d] * kv;
      }
#pragma unroll
      for (int b = 0; b < kMaxTokens; ++b) {
        if (b < nt) scores[b][part * L.kp + k] = acc[b];
      }
    }
  }
  __syncthreads();

  // 3. Top-kh of each half: warp w -> (token w / 2, half w % 2).
  if (warp < 2 * nt) {
    const TokenSmem s(smem, L, warp / 2, block_tokens);
    const int part = warp % 2;
    const float* row = s.scores + part * L.kp;
    float prev_v = INFINITY;  // with index -1: everything comes after it
    int64_t prev_i = -1;
    for (int64_t r = 0; r < kh; ++r) {
      float best_v = 0.0f;
      int64_t best_i = -1;
      for (int64_t k = lane; k < nk; k += 32) {
        const float v = rank_value(row[k]);
        if (before(prev_v, prev_i, v, k) && (best_i < 0 || before(v, k, best_v, best_i))) {
          best_v = v;
          best_i = k;
        }
      }
      warp_best(best_v, best_i);  // kh <= nk: always found
      if (lane == 0) {
        s.v[part * kh + r] = row[best_i];
        s.i[part * kh + r] = static_cast<int32_t>(best_i);
      }
      prev_v = best_v;
      prev_i = best_i;
    }
  }
  __syncthreads();

  // 4. Merge the kh sorted rows into the topk best sums: warp b -> token b.
  if (warp < nt) {
    const TokenSmem s(smem, L, warp, block_tokens);
    for (int64_t a = lane; a < kh; a += 32) s.next[a] = 0;
    __syncwarp();
    for (int64_t r = 0; r < topk; ++r) {
      float best_v = 0.0f;
      int64_t best_a = -1;
      for (int64_t a = lane; a < kh; a += 32) {
        const int32_t b = s.next[a];
        if (b == kh) continue;
        const float v = rank_value(s.v[a] + s.v[kh + b]);
        if (best_a < 0 || before(v, a, best_v, best_a)) {
          best_v = v;
          best_a = a;
        }
      }
      warp_best(best_v, best_a);  // topk <= kh * kh: a row always has a next column
      if (lane == static_cast<int>(best_a % 32)) {
        const int32_t b = s.next[best_a];
        s.sel[r] = s.v[best_a] + s.v[kh + b];
        s.pick[2 * r] = static_cast<int32_t>(best_a);
        s.pick[2 * r + 1] = b;
        s.next[best_a] = b + 1;
      }
      __syncwarp();
    }
    // 5. Indices and gates (fp32 softmax over the selected scores, or ReLU of each).
    const int64_t out = ((t0 + warp) * p.heads + h) * topk;
    float m = -INFINITY;
    for (int64_t r = lane; r < topk; r += 32) m = fmaxf(m, s.sel[r]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float sum = 0.0f;
    if (!p.relu_gates) {
      for (int64_t r = lane; r < topk; r += 32) sum += expf(s.sel[r] - m);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    }
    T* gates = static_cast<T*>(p.gates);
    for (int64_t r = lane; r < topk; r += 32) {
      const int64_t a = s.pick[2 * r], b = s.pick[2 * r + 1];
      p.indices[out + r] = static_cast<int64_t>(s.i[a]) * nk + s.i[kh + b];
      const float v = s.sel[r];
      const float g = p.relu_gates ? (v < 0.0f ? 0.0f : v) : expf(v - m) / sum;
      gates[out + r] = cuda::from_f<T>(g);
    }
  }
}

// Tokens per CTA: as many as fit (at most kMaxTokens); 0 when one token does not fit.
int block_tokens_for(const Layout& L) {
  for (int b = kMaxTokens; b > 0; --b) {
    if (L.bytes(b) <= kSmemLimit) return b;
  }
  return 0;
}

Layout layout_of(int64_t dim_key, int64_t keys_padded, int64_t num_keys, int64_t topk) {
  return Layout{keys_padded, topk < num_keys ? topk : num_keys, topk, dim_key};
}

template <typename T>
Status launch(const RetrieveParams& p, cudaStream_t stream) {
  const Layout L = layout_of(p.dim_key, p.keys_padded, p.num_keys, p.topk);
  const int bt = block_tokens_for(L);
  const dim3 grid(static_cast<unsigned>((p.tokens + bt - 1) / bt), static_cast<unsigned>(p.heads));
  retrieve_kernel<T><<<grid, kThreads, L.bytes(bt), stream>>>(p, L, bt);
  return cuda::last_launch_status();
}

}  // namespace

bool retrieve_cuda_supported(int64_t tokens, int64_t heads, int64_t dim_key, int64_t num_keys,
                             int64_t keys_padded, int64_t topk) {
  if (num_keys >= (int64_t{1} << 31) || heads > 65535 || topk <= 0) return false;
  const Layout L = layout_of(dim_key, keys_padded, num_keys, topk);
  const int bt = block_tokens_for(L);
  return bt > 0 && (tokens + bt - 1) / bt < (int64_t{1} << 31);
}

Status retrieve_cuda(const RetrieveParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (!retrieve_cuda_supported(p.tokens, p.heads, p.dim_key, p.num_keys, p.keys_padded, p.topk)) {
    return Status::unsupported(
        "peer_retrieve: the CUDA kernel needs one token's score tile, lists and query in 48 KiB of "
        "shared memory (about 2 * num_keys + dim_key + 6 * topk floats) and at most 65535 heads");
  }
  if (p.tokens == 0) return Status::ok();
  const auto st = static_cast<cudaStream_t>(stream);
  FL_CUDA_BY_FLOAT_DTYPE(launch, p, st, "peer_retrieve: dtype must be float32, float16 or bfloat16")
}

}  // namespace fastlayers::peer
