// SPDX-License-Identifier: Apache-2.0
// CPU PEER expert kernels, compiled once per ISA into fastlayers::cpu::<isa>::peer. OpenMP over
// tokens (each owns its output row) and over selected experts (each owns its gradient rows). The
// expert rows a token needs are known before it starts (unlike a tree descent), so the rows of the
// pairs kPrefetchAhead ahead are prefetched while the current pair is computed.
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include "common/rows_cpu.h"
#include "common/simd_cpu.h"
#include "fff/activation.h"
#include "peer/peer.h"

namespace fastlayers::cpu::FL_CPU_ISA::peer {

using fastlayers::fff::act_grad;
using fastlayers::fff::act_value;
using fastlayers::peer::ExpertsBwdParams;
using fastlayers::peer::ExpertsFwdParams;
using fastlayers::peer::RetrieveParams;

namespace {

constexpr const char* kDtypeError = "peer: dtype must be float32, float16 or bfloat16";
constexpr int64_t kPrefetchAhead = 2;
constexpr int64_t kParallelMinWork = 1 << 16;

// A sum of many scaled rows, accumulated in blocks of kBlock terms (sum of block sums): the rounding
// error grows with kBlock + terms / kBlock instead of with the number of terms (512 pairs per token
// or thousands of tokens per popular expert are common).
constexpr int kBlock = 32;

struct BlockedRowSum {
  float* total;
  float* block;
  int64_t n;
  int count = 0;

  explicit BlockedRowSum(int64_t n_) : total(new float[2 * n_]), block(total + n_), n(n_) {}
  ~BlockedRowSum() { delete[] total; }
  BlockedRowSum(const BlockedRowSum&) = delete;
  BlockedRowSum& operator=(const BlockedRowSum&) = delete;

  void reset() {
    for (int64_t j = 0; j < 2 * n; ++j) total[j] = 0.0f;
    count = 0;
  }
  template <typename T>
  void add(float s, const T* row) {
    axpy(s, row, block, n);
    if (++count == kBlock) flush();
  }
  void flush() {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      vstore(total + i, vadd(vload(total + i), vload(block + i)));
      vstore(block + i, vzero());
    }
    for (; i < n; ++i) {
      total[i] += block[i];
      block[i] = 0.0f;
    }
    count = 0;
  }
  // Rounds the sum once into out.
  template <typename T>
  void store(T* out) {
    flush();
    int64_t i = 0;
    for (; i + kW <= n; i += kW) vstore(out + i, vload(total + i));
    for (; i < n; ++i) store_as(out + i, total[i]);
  }
};

template <typename T>
void forward_typed(const ExpertsFwdParams& p) {
  const int64_t dim = p.dim, P = p.pairs;
  const T* x = static_cast<const T*>(p.x);
  const T* gates = static_cast<const T*>(p.gates);
  const T* down = static_cast<const T*>(p.down);
  const T* up = static_cast<const T*>(p.up);
  const bool parallel = p.tokens * P * dim >= kParallelMinWork;
  const bool pairs = bf16_dots<T>();
#pragma omp parallel if (parallel && p.tokens > 1)
  {
    BlockedRowSum acc(dim);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      const T* xt = x + t * p.x_row_stride;
      const int64_t* idx = p.indices + t * P;
      acc.reset();
      for (int64_t q = 0; q < kPrefetchAhead && q < P; ++q) {
        prefetch_row(down + idx[q] * dim, dim);
        prefetch_row(up + idx[q] * dim, dim);
      }
      for (int64_t q = 0; q < P; ++q) {
        if (q + kPrefetchAhead < P) {
          prefetch_row(down + idx[q + kPrefetchAhead] * dim, dim);
          prefetch_row(up + idx[q + kPrefetchAhead] * dim, dim);
        }
        const float s = row_dot(xt, down + idx[q] * dim, dim, pairs);
        p.preact[t * P + q] = s;
        acc.add(to_float(gates[t * P + q]) * act_value(p.act, s), up + idx[q] * dim);
      }
      acc.store(static_cast<T*>(p.y) + t * dim);
    }
  }
}

template <typename T>
void backward_typed(const ExpertsBwdParams& p) {
  const int64_t dim = p.dim, P = p.pairs;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* gates = static_cast<const T*>(p.gates);
  const T* down = static_cast<const T*>(p.down);
  const T* up = static_cast<const T*>(p.up);
  const bool parallel = p.tokens * P * dim >= kParallelMinWork;
  const bool pairs = bf16_dots<T>();
#pragma omp parallel if (parallel)
  {
    BlockedRowSum acc(dim);
    // 1. Per token: c = dy . up[e]; dgate = act(s) c; coef = act'(s) gate c; dx = sum coef down[e].
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      const T* dyt = dy + t * dim;
      const int64_t* idx = p.indices + t * P;
      acc.reset();
      for (int64_t q = 0; q < P; ++q) {
        if (q + kPrefetchAhead < P) {
          prefetch_row(down + idx[q + kPrefetchAhead] * dim, dim);
          prefetch_row(up + idx[q + kPrefetchAhead] * dim, dim);
        }
        const float c = row_dot(dyt, up + idx[q] * dim, dim, pairs);
        const float s = p.preact[t * P + q], g = to_float(gates[t * P + q]);
        store_as(static_cast<T*>(p.dgates) + t * P + q, act_value(p.act, s) * c);
        const float coef = act_grad(p.act, s) * g * c;
        p.coef[t * P + q] = coef;
        acc.add(coef, down + idx[q] * dim);
      }
      acc.store(static_cast<T*>(p.dx) + t * dim);
    }
    // (implicit barrier: phase 2 reads every token's coef)
    // 2. Per selected expert, its pairs in token order: compact row u, or (dense) table row ids[u]
    //    after zeroing the unselected rows since the previous selected one; u == unique zeroes the
    //    tail. Every table row is written once, so a fresh (unfaulted) table needs no memset first.
    //    Plain stores, not streaming ones: the tables are just allocated, and the OS zeroes each new
    //    page through the cache as the first store faults it in; streaming stores evicted those
    //    lines and wrote the page to memory twice (the dense step on the Intel Xeon VM: 407-
    //    410 against 492-494 ms at best, 415-424 against 502-505 ms median, 12 steps each).
    T* ddown = static_cast<T*>(p.ddown_rows);
    T* dup = static_cast<T*>(p.dup_rows);
    const int64_t segments = p.unique + (p.dense ? 1 : 0);
#pragma omp for schedule(dynamic, 64) nowait
    for (int64_t u = 0; u < segments; ++u) {
      int64_t row = u;
      if (p.dense) {
        const int64_t gap_begin = u == 0 ? 0 : p.ids[u - 1] + 1;
        row = u == p.unique ? p.num_experts : p.ids[u];
        const int64_t gap_bytes = (row - gap_begin) * dim * static_cast<int64_t>(sizeof(T));
        __builtin_memset(ddown + gap_begin * dim, 0, gap_bytes);
        __builtin_memset(dup + gap_begin * dim, 0, gap_bytes);
        if (u == p.unique) continue;
      }
      const int64_t begin = p.seg_offsets[u], end = p.seg_offsets[u + 1];
      acc.reset();
      for (int64_t k = begin; k < end; ++k) {
        const int64_t pair = p.order[k];
        acc.add(p.coef[pair], x + (pair / P) * p.x_row_stride);
      }
      acc.store(ddown + row * dim);
      acc.reset();
      for (int64_t k = begin; k < end; ++k) {
        const int64_t pair = p.order[k];
        acc.add(act_value(p.act, p.preact[pair]) * to_float(gates[pair]), dy + (pair / P) * dim);
      }
      acc.store(dup + row * dim);
    }
  }
}

// ---- Product-key retrieval ----------------------------------------------------------------------

constexpr int kTokenBlock = 4;  // tokens scored together: each loaded key vector feeds 4 FMAs

// scores[b * out_stride + k] = q_b . key_k for the kTokenBlock query rows q_b = q + b * q_stride
// (fp32, length half) and the sub-keys in panels of kRetrieveKeyTile keys, each panel [half, tile]
// (fp32, transposed: lanes run over keys, so there is no horizontal sum; one panel is a contiguous
// half * 128 B read). 2 * kW keys x 4 tokens = 8 accumulators per step.
void score_tile(const float* q, int64_t q_stride, const float* keys_t, int64_t half, int64_t kp,
                float* scores, int64_t out_stride) {
  constexpr int64_t kTile = fastlayers::peer::kRetrieveKeyTile;
  for (int64_t k0 = 0; k0 < kp; k0 += 2 * kW) {
    V a00 = vzero(), a01 = vzero(), a10 = vzero(), a11 = vzero();
    V a20 = vzero(), a21 = vzero(), a30 = vzero(), a31 = vzero();
    const float* kt = keys_t + (k0 / kTile) * half * kTile + k0 % kTile;
    for (int64_t d = 0; d < half; ++d, kt += kTile) {
      const V k0v = vload(kt), k1v = vload(kt + kW);
      V qb = vset1(q[d]);
      a00 = vfma(qb, k0v, a00);
      a01 = vfma(qb, k1v, a01);
      qb = vset1(q[q_stride + d]);
      a10 = vfma(qb, k0v, a10);
      a11 = vfma(qb, k1v, a11);
      qb = vset1(q[2 * q_stride + d]);
      a20 = vfma(qb, k0v, a20);
      a21 = vfma(qb, k1v, a21);
      qb = vset1(q[3 * q_stride + d]);
      a30 = vfma(qb, k0v, a30);
      a31 = vfma(qb, k1v, a31);
    }
    float* o = scores + k0;
    vstore(o, a00);
    vstore(o + kW, a01);
    vstore(o + out_stride, a10);
    vstore(o + out_stride + kW, a11);
    vstore(o + 2 * out_stride, a20);
    vstore(o + 2 * out_stride + kW, a21);
    vstore(o + 3 * out_stride, a30);
    vstore(o + 3 * out_stride + kW, a31);
  }
}

// The kh largest (value, index) pairs of a stream whose indices arrive in ascending order, sorted
// descending; ties keep the earlier index. The first kh values are always taken, so the indices
// are valid whatever the values (NaN included).
struct TopList {
  float* val;
  int64_t* idx;
  int64_t cap;
  int64_t size = 0;

  void offer(float v, int64_t i) {
    if (size == cap) {
      if (!(v > val[size - 1])) return;
      --size;
    }
    int64_t pos = size++;
    for (; pos > 0 && v > val[pos - 1]; --pos) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
    }
    val[pos] = v;
    idx[pos] = i;
  }
};

// Candidate buffer entries select_top needs for kh.
int64_t candidate_capacity(int64_t kh) { return 8 * kh + 8 * kW; }

// The kh best of scores[0, n) (kh <= n) into (val, idx), sorted descending. A cheap lower bound
// first: split the scores into kh chunks; each chunk's maximum is a distinct score, so the
// smallest of the kh maxima is <= the kh-th best. With less than a vector per chunk (a few
// thousand experts: 64 sub-keys), the lane-wise maxima over the whole vectors are kW distinct
// scores instead, and the kh-th largest of them the bound (kh <= kW). Only scores >= the bound (a
// few times kh of them) are collected, by vector compares, and go through the sorted insertion.
// If the bound is useless (no whole vector, kh > kW there, NaN, too many candidates), every score
// does.
void select_top(const float* scores, int64_t n, int64_t kh, float* val, int64_t* idx,
                float* cand_v, int64_t* cand_i) {
  const int64_t per_chunk = (n / kW) / kh * kW;  // whole vectors per chunk, in scores
  const int64_t cap = candidate_capacity(kh);
  int64_t m = 0;
  bool filtered = per_chunk > 0 || (n >= kW && kh <= kW);
  if (filtered) {
    float bound = __builtin_inff();
    if (per_chunk > 0) {
      for (int64_t c = 0; c < kh; ++c) {
        V mx = vload(scores + c * per_chunk);
        for (int64_t j = kW; j < per_chunk; j += kW) mx = vmax(mx, vload(scores + c * per_chunk + j));
        const float cmax = vmaxval(mx);
        bound = cmax < bound ? cmax : bound;
      }
    } else {
      V mx = vload(scores);
      for (int64_t j = kW; j + kW <= n; j += kW) mx = vmax(mx, vload(scores + j));
      float lanes[kW], top_v[kW];
      int64_t top_i[kW];
      vstore(lanes, mx);
      TopList lane_top{top_v, top_i, kh};
      for (int l = 0; l < kW; ++l) lane_top.offer(lanes[l], l);
      bound = top_v[kh - 1];
    }
    const V vb = vset1(bound);
    int64_t k = 0;
    for (; k + kW <= n && filtered; k += kW) {
      if (m + kW > cap) {
        filtered = false;
        break;
      }
      // Lanes not below the bound (NaN lanes too: they make the count exceed or fall short).
      int mask = ~vgt_mask(vb, vload(scores + k)) & ((1 << kW) - 1);
      for (; mask != 0; mask &= mask - 1) {
        const int lane = __builtin_ctz(static_cast<unsigned>(mask));
        cand_v[m] = scores[k + lane];
        cand_i[m++] = k + lane;
      }
    }
    for (; k < n && filtered; ++k) {
      if (!(bound > scores[k])) {
        if (m == cap) {
          filtered = false;
          break;
        }
        cand_v[m] = scores[k];
        cand_i[m++] = k;
      }
    }
    filtered = filtered && m >= kh && bound == bound;
  }
  TopList list{val, idx, kh};
  if (filtered) {
    for (int64_t c = 0; c < m; ++c) list.offer(cand_v[c], cand_i[c]);
  } else {
    for (int64_t k = 0; k < n; ++k) list.offer(scores[k], k);
  }
}

template <typename T>
void retrieve_typed(const RetrieveParams& p) {
  const int64_t heads = p.heads, dk = p.dim_key, half = dk / 2, nk = p.num_keys;
  const int64_t kp = p.keys_padded, topk = p.topk, kh = topk < nk ? topk : nk;
  const int64_t blocks = (p.tokens + kTokenBlock - 1) / kTokenBlock;
  const T* queries = static_cast<const T*>(p.queries);
  T* gates = static_cast<T*>(p.gates);
  const bool parallel = p.tokens * heads * kp * dk >= kParallelMinWork;
#pragma omp parallel if (parallel)
  {
    float* qf = new float[kTokenBlock * dk];
    float* scores = new float[kTokenBlock * 2 * kp];  // the tile: [block, 2, kp]
    const int64_t cap = candidate_capacity(kh);
    float* vals = new float[2 * kh + topk + cap];  // the two half lists, selected, candidates
    int64_t* ids = new int64_t[3 * kh + cap];
    float *v1 = vals, *v2 = vals + kh, *sel = vals + 2 * kh, *cand_v = sel + topk;
    int64_t *i1 = ids, *i2 = ids + kh, *next = ids + 2 * kh, *cand_i = next + kh;
    // Head-major order: a thread's consecutive blocks share one head's sub-keys (in L2).
#pragma omp for schedule(static)
    for (int64_t w = 0; w < heads * blocks; ++w) {
      const int64_t h = w / blocks, t0 = (w % blocks) * kTokenBlock;
      const int64_t nt = p.tokens - t0 < kTokenBlock ? p.tokens - t0 : kTokenBlock;
      for (int64_t b = 0; b < kTokenBlock; ++b) {  // a partial block repeats its last token
        const T* q = queries + ((t0 + (b < nt ? b : nt - 1)) * heads + h) * dk;
        for (int64_t d = 0; d < dk; ++d) qf[b * dk + d] = to_float(q[d]);
      }
      for (int64_t part = 0; part < 2; ++part) {
        score_tile(qf + part * half, dk, p.keys_t + (h * 2 + part) * half * kp, half, kp,
                   scores + part * kp, 2 * kp);
      }
      for (int64_t b = 0; b < nt; ++b) {
        const float* s1 = scores + b * 2 * kp;
        const float* s2 = s1 + kp;
        select_top(s1, nk, kh, v1, i1, cand_v, cand_i);
        select_top(s2, nk, kh, v2, i2, cand_v, cand_i);
        // Merge the kh sorted rows s1[a] + s2[next[a]]: the best head wins, the lower row on ties
        // (= the lower candidate a * kh + b, the reference's order).
        for (int64_t a = 0; a < kh; ++a) next[a] = 0;
        const int64_t out = ((t0 + b) * heads + h) * topk;
        for (int64_t r = 0; r < topk; ++r) {
          int64_t best = -1;
          float best_v = 0.0f;
          for (int64_t a = 0; a < kh; ++a) {
            if (next[a] == kh) continue;
            const float v = v1[a] + v2[next[a]];
            if (best < 0 || v > best_v) {
              best = a;
              best_v = v;
            }
          }
          sel[r] = best_v;
          p.indices[out + r] = i1[best] * nk + i2[next[best]];
          ++next[best];
        }
        if (p.relu_gates) {
          for (int64_t r = 0; r < topk; ++r) store_as(gates + out + r, sel[r] < 0.0f ? 0.0f : sel[r]);
        } else {
          float m = sel[0], sum = 0.0f;
          for (int64_t r = 1; r < topk; ++r) m = sel[r] > m ? sel[r] : m;
          for (int64_t r = 0; r < topk; ++r) sum += (sel[r] = expf(sel[r] - m));
          const float inv = 1.0f / sum;
          for (int64_t r = 0; r < topk; ++r) store_as(gates + out + r, sel[r] * inv);
        }
      }
    }
    delete[] qf;
    delete[] scores;
    delete[] vals;
    delete[] ids;
  }
}

}  // namespace

Status retrieve(const RetrieveParams& p) { FL_CPU_BY_FLOAT_DTYPE(retrieve_typed, p, kDtypeError) }
Status experts_forward(const ExpertsFwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(forward_typed, p, kDtypeError) }
Status experts_backward(const ExpertsBwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(backward_typed, p, kDtypeError) }


}  // namespace fastlayers::cpu::FL_CPU_ISA::peer
