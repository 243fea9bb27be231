// SPDX-License-Identifier: Apache-2.0
// CPU position-causal variable-length attention, compiled once per ISA into
// fastlayers::cpu::<isa>::skip. Flash-style: a tile of kRows (query, head) rows that share a key/value
// head, key tiles of kKeys, online softmax, fp32 everywhere. Register tiles of kRows x 2 vectors.
//   - Keys are transposed once per call into fp32 [hkv, d, nk], so S = Q K^T runs with lanes over
//     keys: per head dimension t, one key vector and kRows broadcast query elements give kRows FMAs
//     (no horizontal sums).
//   - O += P V with lanes over the value dimension: one value vector, kRows broadcast
//     probabilities, kRows FMAs. The values are copied once per call into fp32 rows per kv head
//     [hkv, nk, dv] (in place their rows are hkv * dv apart: at 16 heads of 64, 4 KiB, and a
//     tile's rows crowded a few L1 sets: 16-20 % slower than at 8 heads).
//   - Each row's visible keys are one range (positions increase within a sequence): key tiles
//     outside the union of a tile's ranges are never read; inside, the rest is masked.
// OpenMP over (key/value head, row tile) tasks, dynamic: tiles late in a causal sequence see more
// keys.
// AVX512-BF16 (ISA level avx512_bf16) with bf16 inputs and an even head dim: S = Q K^T by vdpbf16ps
// on bf16 pairs (two exact products per lane, fp32 sums; the softmax scale multiplies S instead of
// Q), the keys transposed as pairs [hkv, d / 2, nk]; P V unchanged. The backward's S and
// dP = dO V^T likewise (even d, even dv).
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include "common/cpu_isa.h"
#include "common/rows_cpu.h"
#include "common/simd_cpu.h"
#include "skip/skip.h"

namespace fastlayers::cpu::FL_CPU_ISA::skip {

using fastlayers::skip::VarlenBwdParams;
using fastlayers::skip::VarlenParams;

namespace {

// (query, head) rows per tile: kRows x 2 vectors of accumulators, 12 of AVX2's 16 registers, 24 of
// AVX-512's 32 (12 rows there: forward 1-8 %, forward + backward 14-16 % faster than 6 on Zen 4)
constexpr int kRows = kW == 16 ? 12 : 6;
constexpr int64_t kKeys = 64;   // keys per tile (a multiple of every kW)
constexpr float kNegInf = -__builtin_inff();

int64_t lower_bound(const int64_t* a, int64_t n, int64_t v) {  // first i with a[i] >= v
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

int64_t upper_bound(const int64_t* a, int64_t n, int64_t v) {  // first i with a[i] > v
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] <= v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

struct Row {
  int64_t query = 0, head = 0, lo = 0, hi = 0;  // visible keys [lo, hi), absolute indices
};

// Per-thread scratch: Q [kRows][d] (scaled), S [kRows][kKeys] (scores, then probabilities),
// O [kRows][dv], m and l [kRows], and a key tile's last keys (fewer than a vector) transposed
// into whole vectors, zeros after them: [d][kW].
struct Scratch {
  float* base;
  float *q, *s, *o, *m, *l, *k_tail;
  uint32_t* q_pairs;  // the bf16-pair path: Q [kRows][d / 2] as bf16 pairs (unscaled)
  Scratch(int64_t d, int64_t dv)
      : base(new float[kRows * (d + kKeys + dv + 2) + d * kW]),
        q(base), s(q + kRows * d), o(s + kRows * kKeys), m(o + kRows * dv), l(m + kRows),
        k_tail(l + kRows), q_pairs(new uint32_t[kRows * (d / 2) + 1]) {}
  ~Scratch() {
    delete[] base;
    delete[] q_pairs;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// The keys transposed, lanes over keys: out[(g * cols + t) * nk + j] = value(key j of kv head g, t)
// for t < cols (fp32 values, or bf16 pairs for the AVX512-BF16 scores).
template <typename T, typename Out, typename Value>
void transpose_keys(const VarlenParams& p, int64_t cols, Out* out, Value value) {
  const T* k = static_cast<const T*>(p.k);
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (p.nk + kBlock - 1) / kBlock;
#pragma omp for schedule(static)
  for (int64_t task = 0; task < p.hkv * blocks; ++task) {
    const int64_t g = task / blocks, j0 = (task % blocks) * kBlock;
    const int64_t j1 = j0 + kBlock < p.nk ? j0 + kBlock : p.nk;
    for (int64_t t = 0; t < cols; ++t) {
      Out* dst = out + (g * cols + t) * p.nk;
      for (int64_t j = j0; j < j1; ++j) dst[j] = value(k + (j * p.hkv + g) * p.d, t);
    }
  }
}

// The bf16-pair path for products over `width` head dims: bf16 inputs, an even width, and the
// avx512_bf16 level.
template <typename T>
bool pairs_for(int64_t width) {
#if defined(FL_AVX512)
  return IsBf16<T>::value && width % 2 == 0 && active_isa() >= Isa::kAvx512Bf16;
#else
  (void)width;
  return false;
#endif
}

template <typename T>
bool use_pairs(const VarlenParams& p) {
  return pairs_for<T>(p.d);
}

uint32_t bf16_pair(const bf16_t* x) {  // x[0] in the low half, x[1] in the high half
  return static_cast<uint32_t>(x[0].bits) | static_cast<uint32_t>(x[1].bits) << 16;
}

// The last n < kW columns of a transposed block (depth rows, row stride ld) as whole vectors:
// tail[t][i] = b[t][i] for i < n, zeros after them ([depth][kW]). Returns tail.
template <typename E>
const E* tail_block(const E* b, int64_t ld, int64_t depth, int64_t n, E* tail) {
  for (int64_t t = 0; t < depth; ++t) {
    for (int64_t i = 0; i < kW; ++i) tail[t * kW + i] = i < n ? b[t * ld + i] : E{0};
  }
  return tail;
}

#if defined(FL_AVX512)
// S[r][0..nkeys) = scale * Q[r] . K[j0 + ..] from bf16 pairs, lanes over keys: per pair of head
// dims, one or two key vectors and kRows broadcast query pairs give kRows dot products each; the
// last fewer than kW keys are copied into tail ([half][kW], zeros after them), one whole vector.
FL_TARGET_BF16 void scores_pairs(const uint32_t* q, const uint32_t* kt, int64_t nk, int64_t half,
                                 int64_t nkeys, float scale, float* s, uint32_t* tail) {
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t jj = 0;
  for (; jj + 2 * kW <= nkeys; jj += 2 * kW) {
    __m512 a0[kRows], a1[kRows];
    for (int r = 0; r < kRows; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t t = 0; t < half; ++t) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + t * nk + jj);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + t * nk + jj + kW);
      for (int r = 0; r < kRows; ++r) {
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * half + t]));
        a0[r] = _mm512_dpbf16_ps(a0[r], qb, k0);
        a1[r] = _mm512_dpbf16_ps(a1[r], qb, k1);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm512_storeu_ps(s + r * kKeys + jj, _mm512_mul_ps(a0[r], vs));
      _mm512_storeu_ps(s + r * kKeys + jj + kW, _mm512_mul_ps(a1[r], vs));
    }
  }
  for (; jj < nkeys; jj += kW) {
    const uint32_t* kb = kt + jj;
    int64_t stride = nk;
    if (nkeys - jj < kW) {
      kb = tail_block(kb, nk, half, nkeys - jj, tail);
      stride = kW;
    }
    __m512 a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t t = 0; t < half; ++t) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + t * stride);
      for (int r = 0; r < kRows; ++r) {
        a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * half + t])), kv);
      }
    }
    for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(s + r * kKeys + jj, _mm512_mul_ps(a[r], vs));
  }
}
#endif

// out[r][jj] = sum_t a[r][t] * bt[t][j0 + jj] for kRows rows and n keys (bt transposed, row stride
// ld): lanes over keys, two vectors of keys at a time; the last fewer than kW keys are copied into
// tail ([depth][kW], zeros after them) and multiplied as one whole vector.
void rows_times_transposed(const float* a, int64_t depth, const float* bt, int64_t ld, int64_t j0,
                           int64_t n, float* out, float* tail) {
  int64_t jj = 0;
  for (; jj + 2 * kW <= n; jj += 2 * kW) {
    V a0[kRows], a1[kRows];
    for (int r = 0; r < kRows; ++r) a0[r] = a1[r] = vzero();
    const float* b = bt + j0 + jj;
    for (int64_t t = 0; t < depth; ++t) {
      const V b0 = vload(b + t * ld), b1 = vload(b + t * ld + kW);
      for (int r = 0; r < kRows; ++r) {
        const V x = vset1(a[r * depth + t]);
        a0[r] = vfma(x, b0, a0[r]);
        a1[r] = vfma(x, b1, a1[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      vstore(out + r * kKeys + jj, a0[r]);
      vstore(out + r * kKeys + jj + kW, a1[r]);
    }
  }
  for (; jj < n; jj += kW) {
    const float* b = bt + j0 + jj;
    int64_t stride = ld;
    if (n - jj < kW) {
      b = tail_block(b, ld, depth, n - jj, tail);
      stride = kW;
    }
    V acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = vzero();
    for (int64_t t = 0; t < depth; ++t) {
      const V bv = vload(b + t * stride);
      for (int r = 0; r < kRows; ++r) acc[r] = vfma(vset1(a[r * depth + t]), bv, acc[r]);
    }
    for (int r = 0; r < kRows; ++r) vstore(out + r * kKeys + jj, acc[r]);
  }
}

// The workspace's values: fp32 rows [hkv, nk, dv] after the transposed keys (skip.h).
float* values_base(const VarlenParams& p) { return p.k_t + p.hkv * p.d * p.nk; }

template <typename T>
void tile(const VarlenParams& p, int64_t g, const Row* rows, int nrows, Scratch& w, bool pairs) {
  const int64_t d = p.d, dv = p.dv;
  const T* q = static_cast<const T*>(p.q);
  const float* v = values_base(p) + g * p.nk * dv;  // this kv head's values, fp32 rows
  int64_t klo = rows[0].lo, khi = rows[0].hi;
  for (int r = 0; r < kRows; ++r) {
    w.m[r] = kNegInf;
    w.l[r] = 0.0f;
    for (int64_t c = 0; c < dv; ++c) w.o[r * dv + c] = 0.0f;
    if (r < nrows) {
      const T* src = q + (rows[r].query * p.hq + rows[r].head) * d;
      if (pairs) {
        const bf16_t* row = reinterpret_cast<const bf16_t*>(src);  // T is bf16_t here
        for (int64_t t = 0; t < d / 2; ++t) w.q_pairs[r * (d / 2) + t] = bf16_pair(row + 2 * t);
      } else {
        for (int64_t t = 0; t < d; ++t) w.q[r * d + t] = to_float(src[t]) * p.scale;
      }
      klo = rows[r].lo < klo ? rows[r].lo : klo;
      khi = rows[r].hi > khi ? rows[r].hi : khi;
    } else if (pairs) {
      for (int64_t t = 0; t < d / 2; ++t) w.q_pairs[r * (d / 2) + t] = 0;
    } else {
      for (int64_t t = 0; t < d; ++t) w.q[r * d + t] = 0.0f;
    }
  }
  for (int64_t j0 = klo; j0 < khi; j0 += kKeys) {
    const int64_t nkeys = khi - j0 < kKeys ? khi - j0 : kKeys;
    bool scored = false;  // S = Q K^T, lanes over keys
#if defined(FL_AVX512)
    if (pairs) {
      const uint32_t* kt = reinterpret_cast<const uint32_t*>(p.k_t) + g * (d / 2) * p.nk + j0;
      scores_pairs(w.q_pairs, kt, p.nk, d / 2, nkeys, p.scale, w.s, reinterpret_cast<uint32_t*>(w.k_tail));
      scored = true;
    }
#endif
    if (!scored) rows_times_transposed(w.q, d, p.k_t + g * d * p.nk, p.nk, j0, nkeys, w.s, w.k_tail);
    // Mask, online softmax: S becomes P.
    for (int r = 0; r < kRows; ++r) {
      int64_t lo = 0, hi = 0;
      if (r < nrows) {
        lo = rows[r].lo - j0 < 0 ? 0 : rows[r].lo - j0;
        hi = rows[r].hi - j0 > nkeys ? nkeys : rows[r].hi - j0;
      }
      if (p.softcap > 0.0f && hi > lo) softcap_row(w.s + r * kKeys + lo, hi - lo, p.softcap);
      scale_row(w.o + r * dv, dv, softmax_block(w.s + r * kKeys, nkeys, lo, hi, w.m[r], w.l[r]));
    }
    // O += P V, lanes over the value dimension.
    int64_t c = 0;
    for (; c + 2 * kW <= dv; c += 2 * kW) {
      V o0[kRows], o1[kRows];
      for (int r = 0; r < kRows; ++r) {
        o0[r] = vload(w.o + r * dv + c);
        o1[r] = vload(w.o + r * dv + c + kW);
      }
      for (int64_t i = 0; i < nkeys; ++i) {
        const float* vrow = v + (j0 + i) * dv + c;
        const V v0 = vload(vrow), v1 = vload(vrow + kW);
        for (int r = 0; r < kRows; ++r) {
          const V pb = vset1(w.s[r * kKeys + i]);
          o0[r] = vfma(pb, v0, o0[r]);
          o1[r] = vfma(pb, v1, o1[r]);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        vstore(w.o + r * dv + c, o0[r]);
        vstore(w.o + r * dv + c + kW, o1[r]);
      }
    }
    for (; c + kW <= dv; c += kW) {
      V o[kRows];
      for (int r = 0; r < kRows; ++r) o[r] = vload(w.o + r * dv + c);
      for (int64_t i = 0; i < nkeys; ++i) {
        const V vv = vload(v + (j0 + i) * dv + c);
        for (int r = 0; r < kRows; ++r) o[r] = vfma(vset1(w.s[r * kKeys + i]), vv, o[r]);
      }
      for (int r = 0; r < kRows; ++r) vstore(w.o + r * dv + c, o[r]);
    }
    for (; c < dv; ++c) {
      for (int64_t i = 0; i < nkeys; ++i) {
        const float vv = v[(j0 + i) * dv + c];
        for (int r = 0; r < kRows; ++r) w.o[r * dv + c] += w.s[r * kKeys + i] * vv;
      }
    }
  }
  T* out = static_cast<T*>(p.out);
  for (int r = 0; r < nrows; ++r) {
    T* dst = out + (rows[r].query * p.hq + rows[r].head) * dv;
    const float l = w.l[r];
    const bool seen = l > 0.0f || l != l;  // NaN: a non-finite score, propagated as the reference
    const float inv = seen ? 1.0f / l : 0.0f;
    for (int64_t c = 0; c < dv; ++c) store_as(dst + c, w.o[r * dv + c] * inv);
    p.lse[rows[r].query * p.hq + rows[r].head] = seen ? w.m[r] + __builtin_logf(l) : kNegInf;
  }
}

template <typename T>
void attention(const VarlenParams& p) {
  const int64_t group = p.hq / p.hkv;
  const bool pairs = use_pairs<T>(p);
  // Row tiles per sequence: its (query, head-in-group) rows, query-major, kRows at a time.
  int64_t* first_tile = new int64_t[p.batch + 1];
  first_tile[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t rows = (p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]) * group;
    first_tile[b + 1] = first_tile[b] + (rows + kRows - 1) / kRows;
  }
  const int64_t tiles = first_tile[p.batch];
  const int64_t tail = p.cu_seqlens_q[p.batch];  // rows past the last sequence: zeros, -inf
#pragma omp parallel
  {
    const FlushDenormals ftz;  // (each thread, for the call)
    if (p.nk > 0 && pairs) {  // (implicit barrier at the end of either)
      transpose_keys<bf16_t>(p, p.d / 2, reinterpret_cast<uint32_t*>(p.k_t),
                             [](const bf16_t* key, int64_t t) { return bf16_pair(key + 2 * t); });
    } else if (p.nk > 0) {
      transpose_keys<T>(p, p.d, p.k_t, [](const T* key, int64_t t) { return to_float(key[t]); });
    }
    // The values per kv head, fp32 rows [hkv, nk, dv] after the keys (implicit barrier).
    float* values = values_base(p);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < p.nk; ++j) {
      for (int64_t g = 0; g < p.hkv; ++g) {
        const T* src = static_cast<const T*>(p.v) + (j * p.hkv + g) * p.dv;
        float* dst = values + (g * p.nk + j) * p.dv;
        for (int64_t c = 0; c < p.dv; ++c) dst[c] = to_float(src[c]);
      }
    }
    Scratch w(p.d, p.dv);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < p.hkv * tiles; ++task) {
      const int64_t g = task / tiles, tile_id = task % tiles;
      int64_t b = 0;
      {
        int64_t lo = 0, hi = p.batch - 1;  // the sequence whose tiles contain tile_id
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) / 2;
          if (first_tile[mid] <= tile_id) lo = mid; else hi = mid - 1;
        }
        b = lo;
      }
      const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
      const int64_t nk_b = p.cu_seqlens_k[b + 1] - k0;
      const int64_t row_end = (p.cu_seqlens_q[b + 1] - q0) * group;
      const int64_t r0 = (tile_id - first_tile[b]) * kRows;
      Row rows[kRows];
      int nrows = 0;
      for (int64_t ri = r0; ri < row_end && nrows < kRows; ++ri, ++nrows) {
        Row& row = rows[nrows];
        row.query = q0 + ri / group;
        row.head = g * group + ri % group;
        const int64_t pos = p.q_pos[row.query];
        const int64_t* kp = p.k_pos + k0;
        row.lo = k0 + (p.window_left >= 0 ? lower_bound(kp, nk_b, pos - p.window_left) : 0);
        row.hi = k0 + (p.window_right >= 0 ? upper_bound(kp, nk_b, pos + p.window_right) : nk_b);
        if (row.hi < row.lo) row.hi = row.lo;
      }
      tile<T>(p, g, rows, nrows, w, pairs);
    }
#pragma omp for schedule(static)
    for (int64_t i = tail * p.hq; i < p.nq * p.hq; ++i) {
      T* dst = static_cast<T*>(p.out) + i * p.dv;
      for (int64_t c = 0; c < p.dv; ++c) store_as(dst + c, 0.0f);
      p.lse[i] = kNegInf;
    }
  }
  delete[] first_tile;
}

// Backward tiles: kRows (query, head) rows x kKeys keys, like the forward. Per task (sequence, kv
// head) the keys and values are held in fp32 twice: row-major (for dQ += dS K and the dK / dV
// updates) and transposed (lanes over keys for S = Q K^T and dP = dO V^T). With bf16 inputs at the
// avx512_bf16 level, S (even d) and dP (even dv) are products of bf16 pairs by vdpbf16ps, as the
// forward's S: the transposed keys (values) are then bf16 pairs [d / 2, nk] in kt's (vt's) space.
struct BwdTask {
  float *kb, *vb, *kt, *vt, *dkb, *dvb;
  explicit BwdTask(int64_t nk, int64_t d, int64_t dv)
      : kb(new float[nk * (3 * d + 3 * dv) + 1]), vb(kb + nk * d), kt(vb + nk * dv), vt(kt + nk * d),
        dkb(vt + nk * dv), dvb(dkb + nk * d) {}
  ~BwdTask() { delete[] kb; }
  BwdTask(const BwdTask&) = delete;
  BwdTask& operator=(const BwdTask&) = delete;
};

// acc[r][c] += sum_jj w[r][jj] * rows[jj][c] for kRows rows (lanes over c).
void weights_times_rows(const float* w, const float* rows, int64_t n, int64_t width, float* acc) {
  int64_t c = 0;
  for (; c + kW <= width; c += kW) {
    V o[kRows];
    for (int r = 0; r < kRows; ++r) o[r] = vload(acc + r * width + c);
    for (int64_t jj = 0; jj < n; ++jj) {
      const V v = vload(rows + jj * width + c);
      for (int r = 0; r < kRows; ++r) o[r] = vfma(vset1(w[r * kKeys + jj]), v, o[r]);
    }
    for (int r = 0; r < kRows; ++r) vstore(acc + r * width + c, o[r]);
  }
  for (; c < width; ++c) {
    for (int r = 0; r < kRows; ++r) {
      float sum = acc[r * width + c];
      for (int64_t jj = 0; jj < n; ++jj) sum += w[r * kKeys + jj] * rows[jj * width + c];
      acc[r * width + c] = sum;
    }
  }
}

// grad[jj][c] += sum_r w[r][jj] * a[r][c] for n keys (lanes over c): the kRows rows of a, two
// vectors of c wide, stay in registers over the keys, so each FMA loads only its broadcast weight
// (a row load per FMA took twice the loads, and the loads were the limit).
void transposed_weights_times_rows(const float* w, const float* a, int64_t n, int64_t width, float* grad) {
  int64_t c = 0;
  for (; c + 2 * kW <= width; c += 2 * kW) {
    V a0[kRows], a1[kRows];
    for (int r = 0; r < kRows; ++r) {
      a0[r] = vload(a + r * width + c);
      a1[r] = vload(a + r * width + c + kW);
    }
    for (int64_t jj = 0; jj < n; ++jj) {
      float* g = grad + jj * width + c;
      V g0 = vload(g), g1 = vload(g + kW);
      for (int r = 0; r < kRows; ++r) {
        const V x = vset1(w[r * kKeys + jj]);
        g0 = vfma(x, a0[r], g0);
        g1 = vfma(x, a1[r], g1);
      }
      vstore(g, g0);
      vstore(g + kW, g1);
    }
  }
  for (; c + kW <= width; c += kW) {
    V ar[kRows];
    for (int r = 0; r < kRows; ++r) ar[r] = vload(a + r * width + c);
    for (int64_t jj = 0; jj < n; ++jj) {
      float* g = grad + jj * width + c;
      V acc = vload(g);
      for (int r = 0; r < kRows; ++r) acc = vfma(vset1(w[r * kKeys + jj]), ar[r], acc);
      vstore(g, acc);
    }
  }
  for (; c < width; ++c) {
    for (int64_t jj = 0; jj < n; ++jj) {
      float sum = grad[jj * width + c];
      for (int r = 0; r < kRows; ++r) sum += w[r * kKeys + jj] * a[r * width + c];
      grad[jj * width + c] = sum;
    }
  }
}

template <typename T>
void backward(const VarlenBwdParams& bp) {
  const VarlenParams& p = bp.fwd;
  const int64_t group = p.hq / p.hkv, d = p.d, dv = p.dv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(bp.out);
  const T* dout = static_cast<const T*>(bp.dout);
  const bool pairs_s = pairs_for<T>(d), pairs_dp = pairs_for<T>(dv);
#pragma omp parallel
  {
    const FlushDenormals ftz;  // (each thread, for the call)
    // per-thread row-tile scratch: Q, dO, dQ [kRows][d or dv]; S / P / dS [kRows][kKeys] twice;
    // Q and dO as bf16 pairs [kRows][d / 2 or dv / 2] for the pair path
    float* scratch = new float[kRows * (2 * d + dv + 2 * kKeys + 2) + (d > dv ? d : dv) * kW];
    uint32_t* pair_scratch = new uint32_t[kRows * (d + dv) / 2 + 1];
    float *qs = scratch, *dos = qs + kRows * d, *dqs = dos + kRows * dv, *ps = dqs + kRows * d;
    float *dps = ps + kRows * kKeys, *lse = dps + kRows * kKeys, *delta = lse + kRows;
    float* tail = delta + kRows;  // a key tile's last keys (rows_times_transposed, scores_pairs)
    uint32_t *qp = pair_scratch, *dop = qp + kRows * (d / 2);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.batch * p.hkv; ++task) {
      const int64_t b = task / p.hkv, g = task % p.hkv;
      const int64_t q0 = p.cu_seqlens_q[b];
      const int64_t k0 = p.cu_seqlens_k[b], nk_b = p.cu_seqlens_k[b + 1] - k0;
      const int64_t n_rows = (p.cu_seqlens_q[b + 1] - q0) * group;
      BwdTask w(nk_b, d, dv);
      uint32_t* ktp = reinterpret_cast<uint32_t*>(w.kt);  // the pair layouts (pairs_s, pairs_dp)
      uint32_t* vtp = reinterpret_cast<uint32_t*>(w.vt);
      for (int64_t j = 0; j < nk_b; ++j) {
        const T* kr = k + ((k0 + j) * p.hkv + g) * d;
        const T* vr = v + ((k0 + j) * p.hkv + g) * dv;
        for (int64_t c = 0; c < d; ++c) {
          w.kb[j * d + c] = to_float(kr[c]);
          if (!pairs_s) w.kt[c * nk_b + j] = w.kb[j * d + c];
          w.dkb[j * d + c] = 0.0f;
        }
        for (int64_t c = 0; c < dv; ++c) {
          w.vb[j * dv + c] = to_float(vr[c]);
          if (!pairs_dp) w.vt[c * nk_b + j] = w.vb[j * dv + c];
          w.dvb[j * dv + c] = 0.0f;
        }
        if constexpr (IsBf16<T>::value) {
          for (int64_t t = 0; pairs_s && t < d / 2; ++t) ktp[t * nk_b + j] = bf16_pair(kr + 2 * t);
          for (int64_t t = 0; pairs_dp && t < dv / 2; ++t) vtp[t * nk_b + j] = bf16_pair(vr + 2 * t);
        }
      }
      const int64_t* kp = p.k_pos + k0;
      for (int64_t r0 = 0; r0 < n_rows; r0 += kRows) {
        const int nr = n_rows - r0 < kRows ? static_cast<int>(n_rows - r0) : kRows;
        int64_t lo[kRows], hi[kRows], row_of[kRows];
        int64_t klo = nk_b, khi = 0;
        for (int r = 0; r < kRows; ++r) {
          lo[r] = hi[r] = 0;
          row_of[r] = -1;
          for (int64_t c = 0; c < d; ++c) qs[r * d + c] = dqs[r * d + c] = 0.0f;
          for (int64_t c = 0; c < dv; ++c) dos[r * dv + c] = 0.0f;
          for (int64_t t = 0; pairs_s && t < d / 2; ++t) qp[r * (d / 2) + t] = 0;
          for (int64_t t = 0; pairs_dp && t < dv / 2; ++t) dop[r * (dv / 2) + t] = 0;
          lse[r] = 0.0f;
          delta[r] = 0.0f;
          if (r >= nr) continue;
          const int64_t i = q0 + (r0 + r) / group, row = i * p.hq + g * group + (r0 + r) % group;
          row_of[r] = row;
          for (int64_t c = 0; c < d; ++c) qs[r * d + c] = to_float(q[row * d + c]);
          float dd = 0.0f;
          for (int64_t c = 0; c < dv; ++c) {
            dos[r * dv + c] = to_float(dout[row * dv + c]);
            dd += dos[r * dv + c] * to_float(out[row * dv + c]);
          }
          if constexpr (IsBf16<T>::value) {
            for (int64_t t = 0; pairs_s && t < d / 2; ++t) qp[r * (d / 2) + t] = bf16_pair(q + row * d + 2 * t);
            for (int64_t t = 0; pairs_dp && t < dv / 2; ++t) {
              dop[r * (dv / 2) + t] = bf16_pair(dout + row * dv + 2 * t);
            }
          }
          lse[r] = bp.lse[row];
          delta[r] = dd - (bp.dlse != nullptr ? bp.dlse[row] : 0.0f);
          if (lse[r] == kNegInf) continue;  // sees no key: zero gradients
          const int64_t pos = p.q_pos[i];
          lo[r] = p.window_left >= 0 ? lower_bound(kp, nk_b, pos - p.window_left) : 0;
          hi[r] = p.window_right >= 0 ? upper_bound(kp, nk_b, pos + p.window_right) : nk_b;
          if (lo[r] < hi[r]) {
            klo = lo[r] < klo ? lo[r] : klo;
            khi = hi[r] > khi ? hi[r] : khi;
          }
        }
        for (int64_t j0 = klo; j0 < khi; j0 += kKeys) {
          const int64_t n = khi - j0 < kKeys ? khi - j0 : kKeys;
#if defined(FL_AVX512)
          uint32_t* tail_pairs = reinterpret_cast<uint32_t*>(tail);
          if (pairs_s) {
            scores_pairs(qp, ktp + j0, nk_b, d / 2, n, 1.0f, ps, tail_pairs);  // S
          } else {
            rows_times_transposed(qs, d, w.kt, nk_b, j0, n, ps, tail);
          }
          if (pairs_dp) {
            scores_pairs(dop, vtp + j0, nk_b, dv / 2, n, 1.0f, dps, tail_pairs);  // dP = dO V^T
          } else {
            rows_times_transposed(dos, dv, w.vt, nk_b, j0, n, dps, tail);
          }
#else
          rows_times_transposed(qs, d, w.kt, nk_b, j0, n, ps, tail);     // S
          rows_times_transposed(dos, dv, w.vt, nk_b, j0, n, dps, tail);  // dP = dO V^T
#endif
          for (int r = 0; r < kRows; ++r) {
            float* pr = ps + r * kKeys;
            float* dsr = dps + r * kKeys;
            const int64_t a = lo[r] - j0 < 0 ? 0 : lo[r] - j0, e = hi[r] - j0 > n ? n : hi[r] - j0;
            for (int64_t jj = 0; jj < a; ++jj) pr[jj] = dsr[jj] = 0.0f;  // (keys the row does not see)
            for (int64_t jj = e > a ? e : a; jj < n; ++jj) pr[jj] = dsr[jj] = 0.0f;
            int64_t jj = a;
            if (p.softcap <= 0.0f) {  // P = exp(S scale - lse), dS = P (dP - delta) scale, kW keys at a time
              const V vscale = vset1(p.scale), neg_lse = vset1(-lse[r]), neg_delta = vset1(-delta[r]);
              for (; jj + kW <= e; jj += kW) {
                const V pv = vexp(vfma(vload(pr + jj), vscale, neg_lse));
                vstore(pr + jj, pv);
                vstore(dsr + jj, vmul(vmul(pv, vadd(vload(dsr + jj), neg_delta)), vscale));
              }
            }
            for (; jj < e; ++jj) {
              float s = pr[jj] * p.scale, dcap = 1.0f;
              if (p.softcap > 0.0f) {  // s -> c tanh(s / c), ds -> ds (1 - tanh^2)
                const float th = __builtin_tanhf(s / p.softcap);
                s = p.softcap * th;
                dcap = 1.0f - th * th;
              }
              pr[jj] = __builtin_expf(s - lse[r]);
              dsr[jj] = pr[jj] * (dsr[jj] - delta[r]) * dcap * p.scale;
            }
          }
          transposed_weights_times_rows(ps, dos, n, dv, w.dvb + j0 * dv);  // dV += P^T dO
          transposed_weights_times_rows(dps, qs, n, d, w.dkb + j0 * d);    // dK += dS^T Q
          weights_times_rows(dps, w.kb + j0 * d, n, d, dqs);               // dQ += dS K
        }
        for (int r = 0; r < nr; ++r) {
          T* dst = static_cast<T*>(bp.dq) + row_of[r] * d;
          for (int64_t c = 0; c < d; ++c) store_as(dst + c, dqs[r * d + c]);
        }
      }
      for (int64_t j = 0; j < nk_b; ++j) {
        T* dkr = static_cast<T*>(bp.dk) + ((k0 + j) * p.hkv + g) * d;
        T* dvr = static_cast<T*>(bp.dv) + ((k0 + j) * p.hkv + g) * dv;
        for (int64_t c = 0; c < d; ++c) store_as(dkr + c, w.dkb[j * d + c]);
        for (int64_t c = 0; c < dv; ++c) store_as(dvr + c, w.dvb[j * dv + c]);
      }
    }
    delete[] pair_scratch;
    delete[] scratch;
  }
}

}  // namespace

Status varlen_attention(const VarlenParams& p) {
  FL_CPU_BY_FLOAT_DTYPE(attention, p, "varlen_attention: dtype must be float32, float16 or bfloat16")
}

Status varlen_attention_backward(const VarlenBwdParams& p) {
  switch (p.fwd.dtype) {
    case DType::kFloat32:
      backward<float>(p);
      break;
    case DType::kFloat16:
      backward<half_t>(p);
      break;
    case DType::kBFloat16:
      backward<bf16_t>(p);
      break;
    default:
      return Status::invalid("varlen_attention_backward: dtype must be float32, float16 or bfloat16");
  }
  return Status::ok();
}

}  // namespace fastlayers::cpu::FL_CPU_ISA::skip
