// SPDX-License-Identifier: Apache-2.0
// CPU decode attention over an INT4 KV cache, compiled once per ISA into
// fastlayers::cpu::<isa>::kvint4. One task per (batch, kv head; in decode with fewer of those than
// threads, per slice of the group's query heads and per range of the cached tokens, split-KV as
// in flash-decoding, the ranges' softmax states merged after): each cached token's key and value
// rows are dequantized once into fp32 (AVX2 and AVX-512: 8 bytes -> 16 values with integer
// unpacking, kept in a per-16-channel [even | odd] order, and the queries are permuted the same way
// so dot products and value sums need no interleaving), then serve every query head of the GQA
// group; in registers for decode-sized groups (heads_int4), through fp32 buffers otherwise (a
// prefill's rows in tiles of kPrefillRows against the block's keys transposed: heads_rows). Tokens
// in blocks of kTokens with an online softmax; fp32 accumulation. Values may have a head size dv
// of their own (keys d): the accumulators and outputs are dv wide.
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include "common/amx_cpu.h"
#include "common/cpu_isa.h"
#include "common/rows_cpu.h"
#include "common/simd_cpu.h"
#include "kvint4/kvint4.h"

#include <omp.h>

namespace fastlayers::cpu::FL_CPU_ISA::kvint4 {

using fastlayers::kvint4::DecodeParams;
using fastlayers::kvint4::QuantizeParams;
using fastlayers::kvint4::TokenRows;

namespace {

constexpr int64_t kTokens = 32;
constexpr float kNegInf = -__builtin_inff();

// Channel order of a dequantized row: natural, or (chunked) [8 even | 8 odd] per 16 channels.
int64_t position(int64_t c, bool chunked) {
  if (!chunked) return c;
  const int64_t base = c & ~int64_t{15}, i = c & 15;
  return base + (i % 2 == 0 ? i / 2 : 8 + i / 2);
}

#if defined(FL_AVX512)
// AVX-512 dequantizes by table lookup: `tab` holds a group's 16 INT4 code values (by nibble: 0..7,
// then -8..-1) times its scale, and vpermps picks each channel's entry by its nibble. vpermps
// reads only the low 4 bits of each index lane, so the bytes need no masking: lanes 0-7 take the 8
// bytes (their low nibbles: the even channels), lanes 8-15 the bytes shifted right by 4 within
// 16-bit words (their high nibbles; the neighbour's bits shifted in above are ignored). 5
// instructions per 16 channels instead of 10; the same values (a code times its scale is exact).
static inline __m512 int4_table(float scale) {
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  return _mm512_mul_ps(codes, _mm512_set1_ps(scale));
}

// 16 channels from their 8 bytes, in the [8 even | 8 odd] order, from the group's table.
static inline __m512 int4_chunk_lut(const uint8_t* bytes, __m512 tab) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i both = _mm_unpacklo_epi64(b, _mm_srli_epi16(b, 4));
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(both), tab);
}
#endif

#if defined(__AVX2__) && !defined(FL_AVX512)  // (AVX-512: int4_chunk_lut)
// 16 channels from their 8 bytes, in the [8 even | 8 odd] order, times their group's scale.
static inline void int4_chunk(const uint8_t* bytes, __m256 s, __m256& lo, __m256& hi) {
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(_mm256_and_si256(w, low), eight), eight)), s);
  hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(_mm256_srli_epi32(w, 4), eight), eight)), s);
}
#endif

void dequant_row(const uint8_t* bytes, const fp8e4m3_t* scales, int64_t d, int64_t group, bool chunked,
                 float* out) {
  const float* f8 = fp8_values();  // (the scales looked up, not decoded)
#if defined(FL_AVX512)
  if (chunked) {
    for (int64_t g0 = 0; g0 < d; g0 += group) {  // one table per group
      const __m512 tab = int4_table(f8[scales[g0 / group].bits]);
      for (int64_t c = g0; c < g0 + group; c += 16) _mm512_storeu_ps(out + c, int4_chunk_lut(bytes + c / 2, tab));
    }
    return;
  }
#elif defined(__AVX2__)
  if (chunked) {
    for (int64_t g0 = 0; g0 < d; g0 += group) {  // one scale (and no division) per group
      const __m256 s = _mm256_set1_ps(f8[scales[g0 / group].bits]);
      for (int64_t c = g0; c < g0 + group; c += 16) {
        __m256 lo, hi;
        int4_chunk(bytes + c / 2, s, lo, hi);
        _mm256_storeu_ps(out + c, lo);
        _mm256_storeu_ps(out + c + 8, hi);
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < d / 2; ++j) {
    const float s = f8[scales[(2 * j) / group].bits];
    const int lo = bytes[j] & 15, hi = bytes[j] >> 4;
    out[position(2 * j, chunked)] = static_cast<float>((lo ^ 8) - 8) * s;
    out[position(2 * j + 1, chunked)] = static_cast<float>((hi ^ 8) - 8) * s;
  }
}

struct Buffers {
  float *base, *q, *acc, *k, *v, *s, *m, *l, *kt;
  Buffers(int64_t group_heads, int64_t d, int64_t dv)
      : base(new float[group_heads * (d + dv + kTokens + 2) + kTokens * (2 * d + dv)]),
        q(base), acc(q + group_heads * d), k(acc + group_heads * dv), v(k + kTokens * d),
        s(v + kTokens * dv), m(s + group_heads * kTokens), l(m + group_heads), kt(l + group_heads) {}
  ~Buffers() { delete[] base; }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
};

constexpr int kHeads = 4;  // query heads per register tile

// S[g][i] = q[g] . k[i] for heads [g0, g0 + H) and the block's tokens. Keys in pairs: per kW
// channels, two key loads and H query loads serve 2H FMAs, and the 2H sums come out of one
// transposing reduction per four heads (vsum8) instead of a horizontal sum each.
template <int H>
void scores(const float* q, const float* k, int64_t nt, int64_t d, float* s) {
  const int64_t dv = d - d % kW;
  int64_t i = 0;
  if (H % 4 == 0) {
    for (; i + 2 <= nt; i += 2) {
      const float* k0 = k + i * d;
      const float* k1 = k0 + d;
      V a[2 * H];  // a[2h + j]: head h, key i + j
      for (int h = 0; h < 2 * H; ++h) a[h] = vzero();
      for (int64_t c = 0; c < dv; c += kW) {
        const V x0 = vload(k0 + c), x1 = vload(k1 + c);
        for (int h = 0; h < H; ++h) {
          const V qh = vload(q + h * d + c);
          a[2 * h] = vfma(qh, x0, a[2 * h]);
          a[2 * h + 1] = vfma(qh, x1, a[2 * h + 1]);
        }
      }
      for (int h0 = 0; h0 < H; h0 += 4) {
        float sum[8];
        vsum8(a + 2 * h0, sum);
        if (dv < d) {  // channels past the last full vector
          for (int e = 0; e < 8; ++e) {
            const float* qr = q + (h0 + e / 2) * d;
            const float* kr = e % 2 ? k1 : k0;
            for (int64_t cc = dv; cc < d; ++cc) sum[e] += qr[cc] * kr[cc];
          }
        }
        float* sr = s + h0 * kTokens + i;
        for (int e = 0; e < 4; ++e) {
          sr[e * kTokens] = sum[2 * e];
          sr[e * kTokens + 1] = sum[2 * e + 1];
        }
      }
    }
  }
  for (; i < nt; ++i) {
    const float* kr = k + i * d;
    V a[H];
    for (int h = 0; h < H; ++h) a[h] = vzero();
    for (int64_t c = 0; c < dv; c += kW) {
      const V kv = vload(kr + c);
      for (int h = 0; h < H; ++h) a[h] = vfma(vload(q + h * d + c), kv, a[h]);
    }
    for (int h = 0; h < H; ++h) {
      float sum = vsum(a[h]);
      for (int64_t cc = dv; cc < d; ++cc) sum += q[h * d + cc] * kr[cc];
      s[h * kTokens + i] = sum;
    }
  }
}

// acc[g] += sum_i p[g][i] v[i] for heads [g0, g0 + H): accumulators stay in registers over the
// block's tokens, 2 kW channels at a time (two value loads and H broadcasts per 2H FMAs). d
// channels; value rows vs floats apart (d, or the keys' row where the values are its first d).
template <int H>
void values(const float* p, const float* v, int64_t nt, int64_t d, int64_t vs, float* acc) {
  int64_t c = 0;
  for (; c + 2 * kW <= d; c += 2 * kW) {
    V a[H], b[H];
    for (int h = 0; h < H; ++h) {
      a[h] = vload(acc + h * d + c);
      b[h] = vload(acc + h * d + c + kW);
    }
    for (int64_t i = 0; i < nt; ++i) {
      const V x0 = vload(v + i * vs + c), x1 = vload(v + i * vs + c + kW);
      for (int h = 0; h < H; ++h) {
        const V ph = vset1(p[h * kTokens + i]);
        a[h] = vfma(ph, x0, a[h]);
        b[h] = vfma(ph, x1, b[h]);
      }
    }
    for (int h = 0; h < H; ++h) {
      vstore(acc + h * d + c, a[h]);
      vstore(acc + h * d + c + kW, b[h]);
    }
  }
  for (; c + kW <= d; c += kW) {
    V a[H];
    for (int h = 0; h < H; ++h) a[h] = vload(acc + h * d + c);
    for (int64_t i = 0; i < nt; ++i) {
      const V vv = vload(v + i * vs + c);
      for (int h = 0; h < H; ++h) a[h] = vfma(vset1(p[h * kTokens + i]), vv, a[h]);
    }
    for (int h = 0; h < H; ++h) vstore(acc + h * d + c, a[h]);
  }
  for (; c < d; ++c) {
    for (int h = 0; h < H; ++h) {
      float sum = acc[h * d + c];
      for (int64_t i = 0; i < nt; ++i) sum += p[h * kTokens + i] * v[i * vs + c];
      acc[h * d + c] = sum;
    }
  }
}

// H query rows against a block of nt keys starting at token t0; row r sees the block's keys up to
// its last visible token limit[r] (causal): the rest of its scores are masked.
// The online softmax step of H rows over the block's scores (masked past each row's limit): the
// scores become probabilities, and each row's accumulator is rescaled to the new maximum.
// With softcap > 0, the visible scores are soft-capped first (Gemma 2's logit soft-capping).
// (acc: H rows of dv floats, the values' head size.)
template <int H>
void softmax_rows(int64_t nt, int64_t dv, int64_t t0, const int64_t* limit, float softcap, float* s, float* m,
                  float* l, float* acc) {
  for (int h = 0; h < H; ++h) {
    int64_t hi = limit[h] - t0 + 1;
    hi = hi < 0 ? 0 : (hi > nt ? nt : hi);
    if (softcap > 0.0f) softcap_row(s + h * kTokens, hi, softcap);
    scale_row(acc + h * dv, dv, softmax_block(s + h * kTokens, nt, 0, hi, m[h], l[h]));
  }
}

template <int H>
void heads(const float* q, const float* k, const float* v, int64_t nt, int64_t d, int64_t dv, int64_t vs,
           int64_t t0, const int64_t* limit, float softcap, float* s, float* m, float* l, float* acc) {
  scores<H>(q, k, nt, d, s);
  softmax_rows<H>(nt, dv, t0, limit, softcap, s, m, l, acc);
  values<H>(s, v, nt, dv, vs, acc);
}

#if defined(__AVX2__)
// Tasks of many query rows (prefill; a decode's group off the register path): S[r][i] for R rows
// and the 2 kW keys from i0 off the block's keys transposed (kt: d rows of kTokens floats, zeros
// past the block's keys), as GEMM micro-kernels multiply: per channel two key loads and R
// broadcasts serve 2R FMAs, each score one FMA chain over the channels, no horizontal sums
// (scores() sums lanes: a shuffle tree per eight scores, as many shuffles as FMAs at head dim
// 64). The bf16 prefill 1.5-2x faster than on scores()
// (bench/results/kv_int4/cpu-kernel-inline-intel-xeon.md); the sums in another order, so a
// decode step matches its prefill row to fp32 rounding instead of bit for bit.
template <int R>
void scores_rows(const float* q, int64_t d, const float* kt, int64_t i0, float* s) {
  V a[2 * R];
  for (int j = 0; j < 2 * R; ++j) a[j] = vzero();
  for (int64_t c = 0; c < d; ++c) {
    const V k0 = vload(kt + c * kTokens + i0), k1 = vload(kt + c * kTokens + i0 + kW);
    for (int r = 0; r < R; ++r) {
      const V qr = vset1(q[r * d + c]);
      a[2 * r] = vfma(qr, k0, a[2 * r]);
      a[2 * r + 1] = vfma(qr, k1, a[2 * r + 1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    vstore(s + r * kTokens + i0, a[2 * r]);
    vstore(s + r * kTokens + i0 + kW, a[2 * r + 1]);
  }
}

// The block's nt dequantized key rows k (d floats each) as kt: d rows of kTokens floats, zeros
// from key nt to the next multiple of 2 kW (what scores_rows reads). AVX-512: 16 x 16 blocks
// through transpose16 where d is a multiple of 16.
void transpose_keys(const float* k, int64_t nt, int64_t d, float* kt) {
  const int64_t nt_pad = (nt + 2 * kW - 1) / (2 * kW) * (2 * kW);
#if defined(FL_AVX512)
  if (d % 16 == 0) {
    for (int64_t i0 = 0; i0 < nt_pad; i0 += 16) {
      for (int64_t c0 = 0; c0 < d; c0 += 16) {
        __m512i x[16];
        for (int i = 0; i < 16; ++i) {
          x[i] = i0 + i < nt ? _mm512_loadu_si512(k + (i0 + i) * d + c0) : _mm512_setzero_si512();
        }
        transpose16(x);  // x[c]: channel c0 + c of the 16 keys
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(kt + (c0 + c) * kTokens + i0, x[c]);
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t i = 0; i < nt; ++i) kt[c * kTokens + i] = k[i * d + c];
    for (int64_t i = nt; i < nt_pad; ++i) kt[c * kTokens + i] = 0.0f;
  }
}

template <int R>
void heads_rows(const float* q, const float* kt, const float* v, int64_t nt, int64_t d, int64_t dv, int64_t vs,
                int64_t t0, const int64_t* limit, float softcap, float* s, float* m, float* l, float* acc) {
  for (int64_t i0 = 0; i0 < nt; i0 += 2 * kW) scores_rows<R>(q, d, kt, i0, s);
  softmax_rows<R>(nt, dv, t0, limit, softcap, s, m, l, acc);
  values<R>(s, v, nt, dv, vs, acc);
}

// Query rows per prefill tile: 8 on AVX-512 (16 accumulators of 32), 4 on AVX2 (8 of 16).
#if defined(FL_AVX512)
constexpr int kPrefillRows = 8;
#else
constexpr int kPrefillRows = 4;
#endif

// Decode with at most kRegisterHeads query rows per task (GQA groups of <= 4 heads, 8 with AVX-512's
// 32 registers; larger groups in slices of that many, see decode): the block's keys and
// values are dequantized in registers where they are used instead of through the fp32 buffers
// (each byte serves every row once either way). Same values (an INT4 code times its FP8 scale is
// exact in fp32), same channel order and the same per-lane accumulation order as scores() and
// values() on the buffers, and the same lane sums (vsum8 is vsum's tree): bit-identical results
// to those (a decode step is the last row of a causal prefill over its cache wherever that
// prefill's task scores on scores(): fewer rows than a kPrefillRows tile, or the scalar
// variant), without the buffers' stores and reloads. A 16-channel chunk is kChunk vectors: two
// of 8 lanes (AVX2), one of 16 (AVX-512).
constexpr int kChunk = 16 / kW;
#if defined(FL_AVX512)
constexpr int64_t kRegisterHeads = 8;
#else
constexpr int64_t kRegisterHeads = 4;  // (AVX2: 16 registers, two per 16-channel chunk)
#endif

struct Int4Rows {
  const uint8_t* bytes;  // the block's first row, `row` bytes from one row to the next (>= d / 2)
  const float* scales;   // the block's scales as fp32, d / group per row
  int64_t d, group, row;
};

// A block's keys and values in segments of consecutive rows (a paged cache's page parts): block
// tokens [start[s], start[s + 1]) are the rows of k[s] and v[s]; start[segs] tokens in all.
struct Int4Blocks {
  const Int4Rows* k;
  const Int4Rows* v;
  const int64_t* start;
  int64_t segs;
};

// A group's dequantization state: its table (AVX-512) or its scale broadcast (AVX2).
#if defined(FL_AVX512)
static inline V int4_group(float scale) { return {int4_table(scale)}; }
#else
static inline V int4_group(float scale) { return vset1(scale); }
#endif

// 16 channels from their 8 bytes in the [8 even | 8 odd] order, dequantized with their group's
// int4_group state g.
static inline void int4_chunk_v(const uint8_t* bytes, V g, V* x) {
#if defined(FL_AVX512)
  x[0].v = int4_chunk_lut(bytes, g.v);
#else
  int4_chunk(bytes, g.v, x[0].v, x[1].v);
#endif
}

// The sums of scores()' accumulators a[2h + j] (head h, key i + j) into s: per four heads one vsum8
// (bit for bit the vsums), otherwise a vsum each.
template <int H>
static inline void store_pair_scores(const V* a, int64_t i, float* s) {
  int h0 = 0;
  for (; h0 + 4 <= H; h0 += 4) {
    float sum[8];
    vsum8(a + 2 * h0, sum);
    for (int e = 0; e < 8; ++e) s[(h0 + e / 2) * kTokens + i + e % 2] = sum[e];
  }
  for (int e = 2 * h0; e < 2 * H; ++e) s[(e / 2) * kTokens + i + e % 2] = vsum(a[e]);
}

// scores<H> over INT4 keys, keys in pairs as there (two independent FMA chains per head, the
// query loads shared): per 16 channels, the two keys' chunks and 2H FMAs.
template <int H>
void scores_int4(const float* q, const Int4Rows& k, int64_t nt, float* s) {
  const int64_t d = k.d, groups = d / k.group;
  int64_t i = 0;
  for (; i + 2 <= nt; i += 2) {
    const uint8_t* k0 = k.bytes + i * k.row;
    const uint8_t* k1 = k0 + k.row;
    V a[2 * H];  // a[2h + j]: head h, key i + j
    for (int h = 0; h < 2 * H; ++h) a[h] = vzero();
    for (int64_t g = 0; g < groups; ++g) {
      const V s0 = int4_group(k.scales[i * groups + g]), s1 = int4_group(k.scales[(i + 1) * groups + g]);
      for (int64_t c = g * k.group; c < (g + 1) * k.group; c += 16) {
        V x0[kChunk], x1[kChunk];
        int4_chunk_v(k0 + c / 2, s0, x0);
        int4_chunk_v(k1 + c / 2, s1, x1);
        for (int j = 0; j < kChunk; ++j) {
          for (int h = 0; h < H; ++h) {
            const V qh = vload(q + h * d + c + j * kW);
            a[2 * h] = vfma(qh, x0[j], a[2 * h]);
            a[2 * h + 1] = vfma(qh, x1[j], a[2 * h + 1]);
          }
        }
      }
    }
    store_pair_scores<H>(a, i, s);
  }
  for (; i < nt; ++i) {
    V a[H];
    for (int h = 0; h < H; ++h) a[h] = vzero();
    for (int64_t g = 0; g < groups; ++g) {
      const V sc = int4_group(k.scales[i * groups + g]);
      for (int64_t c = g * k.group; c < (g + 1) * k.group; c += 16) {
        V x[kChunk];
        int4_chunk_v(k.bytes + i * k.row + c / 2, sc, x);
        for (int j = 0; j < kChunk; ++j) {
          for (int h = 0; h < H; ++h) a[h] = vfma(vload(q + h * d + c + j * kW), x[j], a[h]);
        }
      }
    }
    for (int h = 0; h < H; ++h) s[h * kTokens + i] = vsum(a[h]);
  }
}

// values<H> over INT4 values for N 16-channel chunks from channel c: the H x N accumulators in
// registers over the block's tokens.
template <int H, int N>
static inline void values_int4_chunks(const float* p, const Int4Rows& v, int64_t nt, int64_t c, float* acc) {
  const int64_t d = v.d, groups = d / v.group;
  V a[H][N * kChunk];
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < N * kChunk; ++j) a[h][j] = vload(acc + h * d + c + j * kW);
  }
  for (int64_t i = 0; i < nt; ++i) {
    V x[N * kChunk], g;
    for (int n = 0; n < N; ++n) {
      const int64_t cn = c + 16 * n;
      if (n == 0 || cn % v.group == 0) g = int4_group(v.scales[i * groups + cn / v.group]);  // (once a group)
      int4_chunk_v(v.bytes + i * v.row + cn / 2, g, x + n * kChunk);
    }
    for (int h = 0; h < H; ++h) {
      const V ph = vset1(p[h * kTokens + i]);
      for (int j = 0; j < N * kChunk; ++j) a[h][j] = vfma(ph, x[j], a[h][j]);
    }
  }
  for (int h = 0; h < H; ++h) {
    for (int j = 0; j < N * kChunk; ++j) vstore(acc + h * d + c + j * kW, a[h][j]);
  }
}

// values<H> over INT4 values: as many 16-channel chunks per pass over the block's tokens as keep
// the H x N accumulators to half the vector registers (AVX-512, 32 registers: 8 chunks for one or
// two heads, 4 for up to four, else 2; AVX2, 16 registers and two per chunk: 2 for up to two
// heads, else 1), then passes of 2 and 1 chunks for the rest. Each pass re-reads the block's
// probabilities and the values' scales, so fewer, wider passes save their broadcasts and group
// tables: one thread's decode of GQA 16/8 at d128 over 8192 tokens 1.07-1.08x faster (one pass of
// 8 chunks instead of four of 2; AVX2 1.02-1.04x); groups of 4 and 8 heads unchanged within noise
// (bench/results/kv_int4/cpu-kernel-inline-intel-xeon.md). The same sums in the same order
// whatever the width: the same bits.
template <int H>
void values_int4(const float* p, const Int4Rows& v, int64_t nt, float* acc) {
#if defined(FL_AVX512)
  constexpr int kWide = H <= 2 ? 8 : H <= 4 ? 4 : 2;  // chunks per pass
#else
  constexpr int kWide = H <= 2 ? 2 : 1;
#endif
  int64_t c = 0;
  for (; c + 16 * kWide <= v.d; c += 16 * kWide) values_int4_chunks<H, kWide>(p, v, nt, c, acc);
  if constexpr (kWide > 2) {
    for (; c + 32 <= v.d; c += 32) values_int4_chunks<H, 2>(p, v, nt, c, acc);
  }
  for (; c < v.d; c += 16) values_int4_chunks<H, 1>(p, v, nt, c, acc);
}

template <int H>
void heads_int4(const float* q, const Int4Blocks& blk, int64_t t0, const int64_t* limit, float softcap, float* s,
                float* m, float* l, float* acc) {
  for (int64_t sg = 0; sg < blk.segs; ++sg) {
    scores_int4<H>(q, blk.k[sg], blk.start[sg + 1] - blk.start[sg], s + blk.start[sg]);
  }
  softmax_rows<H>(blk.start[blk.segs], blk.v[0].d, t0, limit, softcap, s, m, l, acc);
  for (int64_t sg = 0; sg < blk.segs; ++sg) {
    values_int4<H>(s + blk.start[sg], blk.v[sg], blk.start[sg + 1] - blk.start[sg], acc);
  }
}
#endif

#if defined(__AVX2__)
// 16 channels between the natural order and the chunked one ([8 even | 8 odd]), in vector
// registers: the same values as position()'s scalar loops (a permutation; products rounded once).
#if defined(FL_AVX512)
// to_chunked16: chunked lane i holds natural channel idx[i]; from_chunked16 the inverse.
static inline void to_chunked16(V x, float* out) {
  const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(idx, x.v));
}
static inline void from_chunked16(const float* x, V scale, float* out) {
  const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(idx, _mm512_loadu_ps(x)), scale.v));
}
template <typename T>
static inline void load_chunked16(const T* src, V scale, float* out) {
  to_chunked16(vmul(vload(src), scale), out);
}
#else
// (two 8-lane halves: shufps picks the pairs' even / odd members per 128-bit lane, permpd puts
// the lanes in order; unpcklps / unpckhps and two lane permutes undo it)
static inline void to_chunked16(V lo, V hi, float* out) {
  const __m256 e = _mm256_shuffle_ps(lo.v, hi.v, 0x88), o = _mm256_shuffle_ps(lo.v, hi.v, 0xDD);
  _mm256_storeu_ps(out, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
  _mm256_storeu_ps(out + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
}
static inline void from_chunked16(const float* x, V scale, float* out) {
  const __m256 e = _mm256_loadu_ps(x), o = _mm256_loadu_ps(x + 8);
  const __m256 a = _mm256_unpacklo_ps(e, o), b = _mm256_unpackhi_ps(e, o);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x20), scale.v));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x31), scale.v));
}
template <typename T>
static inline void load_chunked16(const T* src, V scale, float* out) {
  to_chunked16(vmul(vload(src), scale), vmul(vload(src + 8), scale), out);
}
#endif
#endif

// A query row times the softmax scale, into the channel order of the dequantized rows.
template <typename T>
void load_query(const T* src, int64_t d, float scale, bool chunked, float* q) {
#if defined(__AVX2__)
  if (chunked) {  // (d a multiple of 16)
    for (int64_t c = 0; c < d; c += 16) load_chunked16(src + c, vset1(scale), q + c);
    return;
  }
#endif
  for (int64_t c = 0; c < d; ++c) q[position(c, chunked)] = to_float(src[c]) * scale;
}

// An output row: the accumulator (in the channel order of the dequantized rows) times 1 / l,
// rounded once to T.
template <typename T>
void store_row(const float* acc, int64_t d, float inv, bool chunked, T* out) {
#if defined(__AVX2__)
  if (chunked) {  // (d a multiple of 16) 16 channels at a time in natural order, then stored
    alignas(64) float x[16];
    for (int64_t c = 0; c < d; c += 16) {
      from_chunked16(acc + c, vset1(inv), x);
      for (int64_t i = 0; i < 16; ++i) store_as(out + c + i, x[i]);
    }
    return;
  }
#endif
  for (int64_t c = 0; c < d; ++c) store_as(out + c, acc[position(c, chunked)] * inv);
}

// The task's outputs: rows r = i * gn + g (query token qi0 + i, head head0 + g) of acc (dv wide,
// in the dequantized rows' channel order) times 1 / l, and their lse.
void store_rows(const DecodeParams& p, int64_t b, int64_t head0, int64_t qi0, int64_t nq, int64_t gn,
                const float* acc, const float* m, const float* l, bool chunked) {
  const int64_t dv = value_dim(p);
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t g = 0; g < gn; ++g) {
      const int64_t r = i * gn + g;
      const int64_t out_row = query_row(p, b, head0 + g, qi0 + i);
      // l > 0: keys were seen; NaN: a non-finite score, which propagates (out and lse NaN, as in
      // the reference); 0: no key (zeros, lse -inf)
      const bool seen = l[r] > 0.0f || l[r] != l[r];
      const float inv = seen ? 1.0f / l[r] : 0.0f;
      if (p.out != nullptr) {
        store_row(acc + r * dv, dv, inv, chunked, p.out + out_row * dv);
      } else if (p.q16_dtype == DType::kFloat16) {
        store_row(acc + r * dv, dv, inv, chunked, static_cast<half_t*>(p.out16) + out_row * dv);
      } else {
        store_row(acc + r * dv, dv, inv, chunked, static_cast<bf16_t*>(p.out16) + out_row * dv);
      }
      p.lse[out_row] = seen ? m[r] + __builtin_logf(l[r]) : kNegInf;
    }
  }
}

// Padding queries (prefill with q_lens): query tokens qi0 .. qi0 + nq - 1 of heads head0 ..
// head0 + gn - 1 of batch row b get zeros and lse -inf (rows of no visible key), without a task.
// (Ragged queries, q_starts, have no padding rows.)
void store_padding(const DecodeParams& p, int64_t b, int64_t head0, int64_t qi0, int64_t nq, int64_t gn) {
  if (p.q_starts != nullptr) return;
  const int64_t dv = value_dim(p);
  for (int64_t g = 0; g < gn; ++g) {
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t out_row = query_row(p, b, head0 + g, qi0 + i);
      for (int64_t c = 0; c < dv; ++c) {
        if (p.out != nullptr) p.out[out_row * dv + c] = 0.0f;
        else if (p.q16_dtype == DType::kFloat16) store_as(static_cast<half_t*>(p.out16) + out_row * dv + c, 0.0f);
        else store_as(static_cast<bf16_t*>(p.out16) + out_row * dv + c, 0.0f);
      }
      p.lse[out_row] = kNegInf;
    }
  }
}

// Query rows per task: kQueryBlock query tokens of every head of the GQA group (on AMX tiles twice
// as many where the tasks still outnumber the threads: see decode).
constexpr int64_t kQueryBlock = 32;

// Split-KV decode: with fewer (batch, kv head, head slice) tasks than threads, each task's cached
// tokens [first, keys) in `splits` ranges of whole kSplitBlock blocks (at least kSplitMinKeys
// tokens each), one task per range; each range leaves its unnormalized outputs, running max and
// sum (a partial: rows x dv, then rows m, then rows l), and merge_splits combines them.
constexpr int64_t kSplitMinKeys = 256;
constexpr int64_t kSplitBlock = 128;  // a multiple of both paths' key blocks (kTokens, kAmxTokens)

struct KeyRange {
  int64_t split, splits;  // this task's range of how many
  float* partial;         // where the range leaves its state (splits > 1), else nullptr
};

// The tokens [begin, end) range `kr` covers of [first, keys).
void key_range(int64_t first, int64_t keys, const KeyRange& kr, int64_t& begin, int64_t& end) {
  const int64_t per = (keys - first + kr.splits - 1) / kr.splits;
  const int64_t chunk = (per + kSplitBlock - 1) / kSplitBlock * kSplitBlock;
  begin = first + kr.split * chunk;
  begin = begin < keys ? begin : keys;
  end = begin + chunk < keys ? begin + chunk : keys;
}

// Asks for the n bytes from p in cache (a paged cache's next page: the hardware prefetchers
// follow streams, not block tables).
template <typename T>
void prefetch_bytes(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 3);
}

// A task's end: its rows stored (store_rows), or its partial state left for merge_splits.
void finish_task(const DecodeParams& p, int64_t b, int64_t head0, int64_t qi0, int64_t nq, int64_t gn,
                 const float* acc, const float* m, const float* l, bool chunked, const KeyRange& kr) {
  if (kr.partial == nullptr) {
    store_rows(p, b, head0, qi0, nq, gn, acc, m, l, chunked);
    return;
  }
  const int64_t rows = nq * gn, dv = value_dim(p);
  for (int64_t i = 0; i < rows * dv; ++i) kr.partial[i] = acc[i];
  for (int64_t r = 0; r < rows; ++r) {
    kr.partial[rows * dv + r] = m[r];
    kr.partial[rows * dv + rows + r] = l[r];
  }
}

// The `splits` partials of one decode task (rows query heads from head0, each `stride` floats
// apart) as one online-softmax state: max M of the ranges' maxima, sums and outputs rescaled by
// exp(m - M) (a range without tokens has l = 0 and adds nothing; NaN propagates as in one pass),
// then stored.
void merge_splits(const DecodeParams& p, int64_t b, int64_t head0, int64_t rows, int64_t splits,
                  const float* partials, int64_t stride, bool chunked, float* acc, float* m, float* l) {
  const int64_t dv = value_dim(p);
  for (int64_t r = 0; r < rows; ++r) {
    float mx = kNegInf;
    for (int64_t s = 0; s < splits; ++s) {
      const float ms = partials[s * stride + rows * dv + r];
      mx = ms > mx ? ms : mx;
    }
    float sum = 0.0f;
    float* out = acc + r * dv;
    for (int64_t c = 0; c < dv; ++c) out[c] = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float* part = partials + s * stride;
      const float ls = part[rows * dv + rows + r];
      if (ls == 0.0f) continue;  // no token in this range
      const float f = __builtin_expf(part[rows * dv + r] - mx);
      sum += ls * f;
      for (int64_t c = 0; c < dv; ++c) out[c] += f * part[r * dv + c];
    }
    m[r] = mx;
    l[r] = sum;
  }
  store_rows(p, b, head0, 0, 1, rows, acc, m, l, chunked);
}

// One (batch, kv head, block of query tokens, slice of the group's heads [g0, g0 + gn)): rows
// r = i * gn + g for query token qi0 + i and group head g0 + g, each seeing the cached tokens up to
// its causal limit.
void task(const DecodeParams& p, int64_t b, int64_t h, int64_t qi0, int64_t nq, int64_t g0, int64_t gn,
          bool chunked, Buffers& w, int64_t* limit, const KeyRange& kr) {
  const int64_t G = p.hq / p.hkv, d = p.d, groups = d / p.group;
  const int64_t dv = value_dim(p), vrow = value_row(p), vsrow = value_scale_row(p);
  // values that are the keys' first dv channels (multi-head latent attention's latent)
  const bool in_keys = p.v == p.k && p.v_scale == p.k_scale && vrow == d / 2 && vsrow == groups;
  const int64_t rows = nq * gn, head0 = h * G + g0;
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t g = 0; g < gn; ++g) {
      const int64_t r = i * gn + g, src = query_row(p, b, head0 + g, qi0 + i) * d;
      if (p.q != nullptr) {
        load_query(p.q + src, d, p.scale, chunked, w.q + r * d);
      } else if (p.q16_dtype == DType::kFloat16) {
        load_query(static_cast<const half_t*>(p.q16) + src, d, p.scale, chunked, w.q + r * d);
      } else {
        load_query(static_cast<const bf16_t*>(p.q16) + src, d, p.scale, chunked, w.q + r * d);
      }
      for (int64_t c = 0; c < dv; ++c) w.acc[r * dv + c] = 0.0f;
      w.m[r] = kNegInf;
      w.l[r] = 0.0f;
      limit[r] = query_limit(p, b, qi0 + i);
    }
  }
  const TokenRows at = token_rows(p, b, h);
  // (with starts: the row's left padding skipped; prefill rows inside it see no token)
  int64_t begin, keys;  // keys: the last row's limit + 1, or the end of this task's key range
  key_range(first_token(p, b), query_keys(p, b, qi0, nq), kr, begin, keys);
  // Blocks of kTokens keys wherever the pages end: the contiguous cache's blocks, so the same
  // online-softmax steps and the same bits. A block's runs of consecutive rows (a paged cache's
  // page parts; one run for a contiguous cache) are its segments: block tokens
  // [seg_start[s], seg_start[s + 1]) in the rows from seg_row[s].
  int64_t seg_start[kTokens + 1], seg_row[kTokens];
  for (int64_t t0 = begin; t0 < keys; t0 += kTokens) {
    const int64_t nt = keys - t0 < kTokens ? keys - t0 : kTokens;
    int64_t segs = 0;
    for (int64_t i = 0; i < nt; ++segs) {
      seg_start[segs] = i;
      seg_row[segs] = at(t0 + i);
      i += at.run(t0 + i) < nt - i ? at.run(t0 + i) : nt - i;
    }
    seg_start[segs] = nt;
    if (at.table != nullptr) {  // the next block's pages that start in it, asked for ahead
      const int64_t end = keys - (t0 + nt) < kTokens ? keys : t0 + nt + kTokens;
      for (int64_t t = t0 + nt; t < end; t += at.run(t)) {
        if (t & at.mask) continue;  // (the rest of a page this block reads: in cache already)
        const int64_t rn = at(t), m = at.run(t) < end - t ? at.run(t) : end - t;
        prefetch_bytes(p.k + rn * (d / 2), m * (d / 2));
        prefetch_bytes(p.k_scale + rn * groups, m * groups);
        if (!in_keys) {
          prefetch_bytes(p.v + rn * vrow, m * vrow);
          prefetch_bytes(p.v_scale + rn * vsrow, m * vsrow);
        }
      }
    }
#if defined(__AVX2__)
    if (chunked && rows <= kRegisterHeads) {  // decode: dequantize in registers (heads_int4)
      const int64_t vgroups = dv / p.group;
      const float* f8 = fp8_values();
      Int4Rows kint4[kTokens], vint4[kTokens];
      for (int64_t sg = 0; sg < segs; ++sg) {
        // (the FP8 scales once, looked up: the fp32 buffers are free)
        const int64_t i0 = seg_start[sg], n = seg_start[sg + 1] - i0, r0 = seg_row[sg];
        for (int64_t j = 0; j < n * groups; ++j) w.k[i0 * groups + j] = f8[p.k_scale[r0 * groups + j].bits];
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < vgroups; ++j) {
            w.v[(i0 + i) * vgroups + j] = f8[p.v_scale[(r0 + i) * vsrow + j].bits];
          }
        }
        kint4[sg] = Int4Rows{p.k + r0 * (d / 2), w.k + i0 * groups, d, p.group, d / 2};
        vint4[sg] = Int4Rows{p.v + r0 * vrow, w.v + i0 * vgroups, dv, p.group, vrow};
      }
      const Int4Blocks blk{kint4, vint4, seg_start, segs};
      switch (rows) {
#if defined(FL_AVX512)
        case 8: heads_int4<8>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
        case 7: heads_int4<7>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
        case 6: heads_int4<6>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
        case 5: heads_int4<5>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
#endif
        case 4: heads_int4<4>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
        case 3: heads_int4<3>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
        case 2: heads_int4<2>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
        default: heads_int4<1>(w.q, blk, t0, limit, p.softcap, w.s, w.m, w.l, w.acc); break;
      }
      continue;
    }
#endif
    for (int64_t sg = 0; sg < segs; ++sg) {
      for (int64_t i = seg_start[sg]; i < seg_start[sg + 1]; ++i) {
        const int64_t r = seg_row[sg] + (i - seg_start[sg]);
        dequant_row(p.k + r * (d / 2), p.k_scale + r * groups, d, p.group, chunked, w.k + i * d);
        if (!in_keys) dequant_row(p.v + r * vrow, p.v_scale + r * vsrow, dv, p.group, chunked, w.v + i * dv);
      }
    }
    // (values that are the keys' first dv channels: read from the dequantized key rows)
    const float* vb = in_keys ? w.k : w.v;
    const int64_t vs = in_keys ? d : dv;
    int64_t r = 0;
#if defined(__AVX2__)
    if (rows >= kPrefillRows) {  // prefill: the block's keys transposed once for all its rows
      transpose_keys(w.k, nt, d, w.kt);
      for (; r + kPrefillRows <= rows; r += kPrefillRows) {
        heads_rows<kPrefillRows>(w.q + r * d, w.kt, vb, nt, d, dv, vs, t0, limit + r, p.softcap, w.s + r * kTokens,
                                 w.m + r, w.l + r, w.acc + r * dv);
      }
    }
#endif
    for (; r + kHeads <= rows; r += kHeads) {
      heads<kHeads>(w.q + r * d, w.k, vb, nt, d, dv, vs, t0, limit + r, p.softcap, w.s + r * kTokens, w.m + r,
                    w.l + r, w.acc + r * dv);
    }
    for (; r < rows; ++r) {
      heads<1>(w.q + r * d, w.k, vb, nt, d, dv, vs, t0, limit + r, p.softcap, w.s + r * kTokens, w.m + r, w.l + r,
               w.acc + r * dv);
    }
  }
  finish_task(p, b, head0, qi0, nq, gn, w.acc, w.m, w.l, chunked, kr);
}

// One row as fp32: x, rotated by RoPE when the call has cos/sin (exact products in double, one
// rounding), times the post-RoPE scale (one more fp32 rounding, as x.float() * s in the reference).
template <typename T>
void load_row(const QuantizeParams& p, int64_t r, float* row) {
  const T* x = static_cast<const T*>(p.x) + r * p.d;
  const int64_t d = p.d, half = d / 2;
  if (p.cos != nullptr) {
    const int64_t t = r % p.tokens, b = r / (p.tokens * p.heads);
    const float* cs = p.cos + b * p.cos_batch_stride + t * d;
    const float* sn = p.sin + b * p.cos_batch_stride + t * d;
    // (branch-free loops, one per half or per pair member: the compiler vectorizes them, the
    // products in double lanes; interleaved pairs 1.8x faster than one loop with the branches)
    const auto rotate = [](float a, float cos_c, float partner, float sin_c) {
      return static_cast<float>(static_cast<double>(a) * cos_c + static_cast<double>(partner) * sin_c);
    };
    if (p.interleaved) {
      for (int64_t c = 0; c < d; c += 2) {
        const float a = to_float(x[c]), b = to_float(x[c + 1]);
        row[c] = rotate(a, cs[c], -b, sn[c]);
        row[c + 1] = rotate(b, cs[c + 1], a, sn[c + 1]);
      }
    } else {
      for (int64_t c = 0; c < half; ++c) row[c] = rotate(to_float(x[c]), cs[c], -to_float(x[c + half]), sn[c]);
      for (int64_t c = half; c < d; ++c) row[c] = rotate(to_float(x[c]), cs[c], to_float(x[c - half]), sn[c]);
    }
  } else {
    int64_t c = 0;
    for (; c + kW <= d; c += kW) vstore(row + c, vload(x + c));
    for (; c < d; ++c) row[c] = to_float(x[c]);
  }
  if (p.post_scale != nullptr) {
    const float* post = p.post_scale + ((r / p.tokens) % p.heads) * d;
    int64_t c = 0;
    for (; c + kW <= d; c += kW) vstore(row + c, vmul(vload(row + c), vload(post + c)));
    for (; c < d; ++c) row[c] *= post[c];
  }
}

// max |x[c]| over c < n; NaN when any x[c] is NaN (as torch's amax).
float abs_max(const float* x, int64_t n) {
  V m = vzero();
  bool nan = false;
  int64_t c = 0;
  for (; c + kW <= n; c += kW) {
    const V a = vabs(vload(x + c));
    nan = nan || vany_nan(a);
    m = vmax(m, a);
  }
  float amax = c > 0 ? vmaxval(m) : 0.0f;
  for (; c < n; ++c) {
    const float a = __builtin_fabsf(x[c]);
    amax = a > amax || a != a ? a : amax;
  }
  return nan ? __builtin_nanf("") : amax;
}

// The query side of quantize: the row through FP8 (one scale max|row| / 448, 1 for an all-zero
// row; a NaN anywhere gives scale 1 and stays NaN), or as it is. The division is a true one, as
// in the reference; the rounding to FP8 is vround_fp8's (to_fp8e4m3's, kW lanes at a time).
void query_row(const QuantizeParams& p, const float* row, float* out) {
  if (!p.q_fp8) {
    for (int64_t c = 0; c < p.d; ++c) out[c] = row[c];
    return;
  }
  const float amax = abs_max(row, p.d);
  const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
  const V vs = vset1(s);
  int64_t c = 0;
  for (; c + kW <= p.d; c += kW) vstore(out + c, vmul(vround_fp8(vdiv(vload(row + c), vs)), vs));
  for (; c < p.d; ++c) out[c] = to_float(to_fp8e4m3(row[c] / s)) * s;
}

template <typename T>
void quantize_rows(const QuantizeParams& p) {
  const bool parallel = p.rows * p.d >= (1 << 16);
#pragma omp parallel if (parallel)
  {
    float* row = new float[p.d];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t o = p.q_out != nullptr ? 0 : output_row(p, r);
      if (o < 0) continue;  // (a paged write's padding token)
      load_row<T>(p, r, row);
      if (p.q_out != nullptr) {
        query_row(p, row, p.q_out + r * p.d);
        continue;
      }
      uint8_t* out = p.packed + o * (p.d / 2);
      for (int64_t g0 = 0; g0 < p.d; g0 += p.group) {
        const float amax = abs_max(row + g0, p.group);  // a NaN wins (as torch's amax)
        // fp8(max / 7), at least 2^-9: the reference's to_fp8(amax / 7).clamp_min(2^-9). A group
        // holding a NaN gets the NaN scale (code 0x7F) and zero nibbles, as in the reference: its
        // values dequantize to NaN instead of passing for zeros.
        float s8 = to_float(to_fp8e4m3(amax / 7.0f));
        if (s8 < 0.001953125f) s8 = 0.001953125f;
        p.scales[o * (p.d / p.group) + g0 / p.group] = to_fp8e4m3(s8);
        int64_t c = g0;
        if constexpr (kW > 1) {  // kW values at a time (kW even: whole bytes), as the loop below
          const V vs8 = vset1(s8), lo = vset1(-8.0f), hi = vset1(7.0f);
          for (; c + kW <= g0 + p.group; c += kW) {
            vstore_nibbles(out + c / 2, vmin(vmax(vzero_nan(vrint(vdiv(vload(row + c), vs8))), lo), hi));
          }
        }
        for (; c < g0 + p.group; c += 2) {
          int q[2];
          for (int e = 0; e < 2; ++e) {
            float qf = __builtin_nearbyintf(row[c + e] / s8);
            qf = qf != qf ? 0.0f : (qf < -8.0f ? -8.0f : (qf > 7.0f ? 7.0f : qf));  // (NaN -> 0)
            q[e] = static_cast<int>(qf) & 15;
          }
          out[c / 2] = static_cast<uint8_t>(q[0] | (q[1] << 4));
        }
      }
    }
    delete[] row;
  }
}

}  // namespace

Status quantize(const QuantizeParams& p) {
  FL_CPU_BY_FLOAT_DTYPE(quantize_rows, p, "kv_quantize: dtype must be float32, float16 or bfloat16")
}

#if defined(FL_AMX)
// ---- AMX-BF16 (ISA level amx_bf16): attention on tiles ------------------------------------------
// A task of 8 or more query rows (prefill: up to 32 query tokens x the group's heads; decode: 8 or
// more heads per task) multiplies on AMX tiles (common/amx_cpu.h), rows padded to 16-row blocks.
// An INT4 code times its FP8 scale is exact in bf16 (7 significant bits), so the dequantized keys
// and values are exact there; the queries (unscaled: the softmax scale
// multiplies the scores) and the probabilities are split into bf16 parts (stage_queries: three for fp32,
// |x - sum| <= 2^-25 |x|; a bf16 query is one exact part, an fp16 one two), each multiplied in turn.
// The products are exact and the sums fp32, so fp32 queries keep fp32 accuracy where a single bf16
// rounding would cost 2^-9 (two parts, 2^-17, left errors a 3-layer model's logits amplified past
// 1e-4). The probabilities take as many parts as the queries: 16-bit queries get a 16-bit output,
// and their probabilities are rounded once to bf16 (one part) or split in two for fp16, as
// FlashAttention multiplies P in the inputs' 16-bit type (bf16 prefill 1.21x, the error to the
// float64 reference unchanged: the output's rounding dominates it).
//   Scores, transposed: S^T[key][row] = K . Q^T, the keys the A operand (dequantized rows in natural
// order, 16 keys x 32 channels a tile), the queries the B operand (staged once per task in the pair
// layout); 2 key blocks x 1 or 2 row blocks of C per pass. The C tiles stay as they are, keys x
// rows: the online softmax (softmax_block_rows) runs on 16 rows at a time in the vector lanes (no
// horizontal maxima or sums), and one transpose per 16 rows x 32 keys turns the probabilities'
// bf16 parts into the rows of the values' A operand (a transpose per 16 x 16 scores before).
//   Values: O[row][c] += P . V, the probabilities the A operand (bf16 parts, key rows), the
// values the B operand (dequantized rows interleaved in key pairs); the accumulators are the
// running outputs themselves (16 rows x 16 channels of acc a tile), 1 or 2 row blocks x 2 channel
// blocks per pass.
// Rows per task from which a call runs on tiles: prefill, and decode with 8 or more query heads per
// task (one 16-row block: multi-head latent attention's 16 heads in two slices of 8 ran
// 1.26-1.30x the register path at 4096 tokens, GQA groups of 8 1.02-1.04x; groups of 4 keep the
// register path, a tile would carry 4 useful rows of 16).
constexpr int64_t kAmxMinRows = 8;
constexpr int64_t kAmxTokens = 128;  // keys per block (the online softmax's per-row cost is per block)

struct AmxBuffers {
  uint32_t* q[3];        // the queries' bf16 parts: [row block][32-channel block][16 channel pairs][16 rows]
  uint16_t* k;            // [kAmxTokens][d] bf16, natural order
  uint16_t* v;            // [kAmxTokens][dv] bf16, natural order
  uint32_t* v_pairs;      // [kAmxTokens / 2][dv] (key 2 i, key 2 i + 1) per channel
  uint16_t* p[3];         // the probabilities' bf16 parts: [rows][kAmxTokens]
  float* s;               // scores S^T as the C tiles leave them: [row block][kAmxTokens keys][16 rows]
  float* acc;             // [rows][dv]
  AmxBuffers(int64_t rows, int64_t d, int64_t dv)
      : q{new uint32_t[rows * d / 2], new uint32_t[rows * d / 2], new uint32_t[rows * d / 2]},
        k(new uint16_t[kAmxTokens * d]),
        v(new uint16_t[kAmxTokens * dv]), v_pairs(new uint32_t[kAmxTokens / 2 * dv]),
        p{new uint16_t[rows * kAmxTokens], new uint16_t[rows * kAmxTokens], new uint16_t[rows * kAmxTokens]},
        s(new float[rows * kAmxTokens]),
        acc(new float[rows * dv]) {}
  ~AmxBuffers() {
    delete[] s;
    for (uint32_t* part : q) delete[] part;
    delete[] k;
    delete[] v;
    delete[] v_pairs;
    for (uint16_t* part : p) delete[] part;
    delete[] acc;
  }
  AmxBuffers(const AmxBuffers&) = delete;
  AmxBuffers& operator=(const AmxBuffers&) = delete;
};

// The task's query rows (fp32, rows of d channels; zeros for the padding rows up to rows16) as
// their `parts` bf16 parts (16 rows x 32 channels at a time) in the B operand layout:
// per (16-row block, 32-channel block) 16 channel pairs x 16 rows of dwords, a transpose of the
// rows' pairs. Each part is the top 16 bits of what the parts before leave, the third (fp32
// queries) rounded to nearest even: |x - sum| <= 2^-25 |x| (fp32's own rounding). A bf16 query is
// its one part, an fp16 one its two (what the first leaves fits bf16).
template <int parts>
FL_TARGET_AMX void stage_queries(const float* q, int64_t rows, int64_t rows16, int64_t d, uint32_t* const* out) {
  const int64_t cbs = d / 32;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t rb = 0; rb < rows16 / 16; ++rb) {
    for (int64_t cb = 0; cb < cbs; ++cb) {
      __m512i v[parts][16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = rb * 16 + i;
        __m512 x[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        if (r < rows) {
          x[0] = _mm512_loadu_ps(q + r * d + cb * 32);
          x[1] = _mm512_loadu_ps(q + r * d + cb * 32 + 16);
        }
        for (int j = 0; j < parts; ++j) {
          __m256i half[2];
          for (int u = 0; u < 2; ++u) {
            const __m512i bits = _mm512_castps_si512(x[u]);
            half[u] = j + 1 < parts || parts < 3 ? _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16))
                                                 : (__m256i)_mm512_cvtneps_pbh(x[u]);
            x[u] = _mm512_sub_ps(x[u], _mm512_castsi512_ps(_mm512_and_si512(bits, high)));
          }
          v[j][i] = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);  // (channel pairs)
        }
      }
      for (int j = 0; j < parts; ++j) {
        transpose16(v[j]);  // v[j][c]: channel pair c of the block's 16 rows
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(out[j] + (rb * cbs + cb) * 256 + c * 16, v[j][c]);
      }
    }
  }
}

// One INT4 row (n channels, even) -> bf16 in natural order: per 32 channels int4_lookup_bf16 in
// the group's 16 code values times its scale (exact in bf16), the rest channel pair by pair.
FL_TARGET_AMX void dequant_row_bf16(const uint8_t* bytes, const fp8e4m3_t* scales, int64_t n, int64_t group,
                                    uint16_t* out) {
  const float* f8 = fp8_values();
  for (int64_t g0 = 0; g0 < n; g0 += group) {
    const float s = f8[scales[g0 / group].bits];
    const __m512i tab = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(int4_table(s)));
    const int64_t end = g0 + group < n ? g0 + group : n;
    int64_t c = g0;
    for (; c + 32 <= end; c += 32) _mm512_storeu_si512(out + c, int4_lookup_bf16(bytes + c / 2, tab));
    for (; c < end; c += 2) {  // (a group of 16 channels or a partial last block)
      const int lo = bytes[c / 2] & 15, hi = bytes[c / 2] >> 4;
      out[c] = to_bf16(static_cast<float>((lo ^ 8) - 8) * s).bits;
      out[c + 1] = to_bf16(static_cast<float>((hi ^ 8) - 8) * s).bits;
    }
  }
}

// e^x in the lanes of `keep` (0 in the others) for the softmax's exponents: vexp's reduction and
// polynomial, the power of two applied by vscalefps instead of built in the exponent bits, and x
// below -87.3 (e^x no longer a normal fp32) masked to 0 as vexp clamps it, so that no denormal
// reaches the sums; NaN stays NaN. One compare instead of vexp's two clamps and two blends.
FL_TARGET_AMX static inline __m512 exp_scalef(__mmask16 keep, __m512 x) {
  __m512 n;
  const __m512 p = exp_parts(x, n);
  keep &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365478515625f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// The online softmax step (softmax_block's) of one 16-row block over a key block, on the scores
// S^T as the tiles leave them (st: nt32 keys x 16 rows, unscaled): 16 rows at a time in the lanes,
// so the maxima and sums need no horizontal reductions. Row i sees the block's keys [0, hi[i])
// (none for padding rows); times the softmax `scale`, soft-capped when softcap > 0; the running
// max m and sum l of the rows (16 each) updated, each row's accumulator (acc: 16 rows of dv) scaled
// to its new max; a row without visible keys keeps m, l and acc. The probabilities leave in the
// A-operand layout of the values' product: `parts` bf16 parts (the top 16 bits of what is left,
// the last part rounded; zeros past hi), p[j] + at: 16 rows of kAmxTokens keys, by one transpose
// per 32 keys.
template <int parts>
FL_TARGET_AMX void softmax_block_rows(float* st, int64_t nt32, const int32_t* hi, float scale, float softcap,
                                      int64_t at, uint16_t* const* p, float* m, float* l, float* acc, int64_t dv) {
  const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i vhi = _mm512_loadu_si512(hi), high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i pair_words = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  int64_t keys = 0;  // (the keys any row sees)
  for (int i = 0; i < 16; ++i) keys = hi[i] > keys ? hi[i] : keys;
  // A positive scale without soft-capping is folded into the maximum (scaling is monotonic: the
  // scaled maximum is the maximum's rounded product) and into the exponents (e^(s scale - m), one
  // rounding), saving a pass over the scores; otherwise they are scaled (and capped) in place.
  const bool fold = softcap <= 0.0f && scale > 0.0f;
  const __m512 exp_scale = fold ? vscale : _mm512_set1_ps(1.0f);
  if (!fold) {
    for (int64_t i = 0; i < keys; ++i) _mm512_storeu_ps(st + i * 16, _mm512_mul_ps(_mm512_loadu_ps(st + i * 16), vscale));
    if (softcap > 0.0f) softcap_row(st, keys * 16, softcap);
  }
  __m512 mx = neg_inf;
  for (int64_t i = 0; i < keys; ++i) {
    const __mmask16 seen = _mm512_cmpgt_epi32_mask(vhi, _mm512_set1_epi32(static_cast<int>(i)));
    mx = _mm512_mask_max_ps(mx, seen, mx, _mm512_loadu_ps(st + i * 16));
  }
  mx = _mm512_mul_ps(mx, exp_scale);
  const __mmask16 any = _mm512_cmpgt_epi32_mask(vhi, _mm512_setzero_si512());
  const __m512 vm = _mm512_loadu_ps(m);
  // m_new = mx where a row sees keys and mx > m (else m: NaN compares false, as softmax_block), so
  // alpha = exp(m - m_new) is 1 for rows without visible keys; 0 while nothing was seen
  const __m512 m_new = _mm512_mask_blend_ps(_mm512_mask_cmp_ps_mask(any, mx, vm, _CMP_GT_OQ), vm, mx);
  __m512 alpha = vexp(V{_mm512_sub_ps(vm, m_new)}).v;
  alpha = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(vm, neg_inf, _CMP_EQ_OQ), alpha, _mm512_setzero_ps());
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < nt32; i0 += 32) {  // 32 keys: 16 key pairs x 16 rows, transposed
    __m512i w[parts][16];
    for (int kp = 0; kp < 16; ++kp) {
      __m512 e[2];
      for (int u = 0; u < 2; ++u) {
        const int64_t i = i0 + 2 * kp + u;
        const __mmask16 seen = i < keys ? _mm512_cmpgt_epi32_mask(vhi, _mm512_set1_epi32(static_cast<int>(i))) : 0;
        e[u] = seen ? exp_scalef(seen, _mm512_fmsub_ps(_mm512_loadu_ps(st + i * 16), exp_scale, m_new))
                    : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, e[u]);
      }
      for (int j = 0; j < parts; ++j) {
        const __m512i b0 = _mm512_castps_si512(e[0]), b1 = _mm512_castps_si512(e[1]);
        if (j + 1 < parts) {  // (the top 16 bits: key 2 kp in the low word, 2 kp + 1 in the high)
          w[j][kp] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(b0, 16), b1, high, 0xF8);
        } else {
          w[j][kp] = _mm512_permutexvar_epi16(pair_words, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
        }
        e[0] = _mm512_sub_ps(e[0], _mm512_castsi512_ps(_mm512_and_si512(b0, high)));
        e[1] = _mm512_sub_ps(e[1], _mm512_castsi512_ps(_mm512_and_si512(b1, high)));
      }
    }
    for (int j = 0; j < parts; ++j) {
      transpose16(w[j]);  // w[j][r]: row r's 32 keys from i0, in pairs
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(p[j] + at + r * kAmxTokens + i0, w[j][r]);
    }
  }
  _mm512_storeu_ps(l, _mm512_mask_blend_ps(any, _mm512_loadu_ps(l), _mm512_fmadd_ps(_mm512_loadu_ps(l), alpha, sum)));
  _mm512_storeu_ps(m, m_new);
  alignas(64) float a16[16];
  _mm512_store_ps(a16, alpha);
  for (int r = 0; r < 16; ++r) scale_row(acc + r * dv, dv, a16[r]);
}

// S^T for key blocks (kb0, kb0 + 1) x RB row blocks from rb0 over d: C tile (key block kb0 + j,
// row block rb0 + h) stored as it is, 16 keys x 16 rows, at a.s's row block rb0 + h, keys from
// 16 (kb0 + j).
template <int RB>
FL_TARGET_AMX void scores_tiles(const AmxBuffers& a, int64_t d, int q_parts, int64_t kb0, int64_t rb0) {
  const int64_t cbs = d / 32;
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (RB == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t cb = 0; cb < cbs; ++cb) {
    _tile_loadd(4, a.k + kb0 * 16 * d + cb * 32, d * 2);
    _tile_loadd(5, a.k + (kb0 + 1) * 16 * d + cb * 32, d * 2);
    for (int j = 0; j < q_parts; ++j) {
      const uint32_t* x = a.q[j] + (rb0 * cbs + cb) * 256;
      _tile_loadd(6, x, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (RB == 2) {
        _tile_loadd(7, x + cbs * 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  float* c = a.s + (rb0 * kAmxTokens + kb0 * 16) * 16;
  _tile_stored(0, c, 64);
  _tile_stored(2, c + 256, 64);
  if constexpr (RB == 2) {
    _tile_stored(1, c + kAmxTokens * 16, 64);
    _tile_stored(3, c + kAmxTokens * 16 + 256, 64);
  }
  amx_fence();
}

// acc rows of RB row blocks from rb0 x channels [c0, c0 + 32) += P . V over the block's keys
// [0, 32 chunks): C tile 2 h + (channel block).
template <int RB>
FL_TARGET_AMX void values_tiles(AmxBuffers& a, int64_t dv, int p_parts, int64_t rb0, int64_t c0, int64_t chunks) {
  float* acc = a.acc + rb0 * 16 * dv + c0;
  _tile_loadd(0, acc, dv * 4);
  _tile_loadd(1, acc + 16, dv * 4);
  if constexpr (RB == 2) {
    _tile_loadd(2, acc + 16 * dv, dv * 4);
    _tile_loadd(3, acc + 16 * dv + 16, dv * 4);
  }
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const uint32_t* vp = a.v_pairs + kc * 16 * dv + c0;
    const int64_t p0 = rb0 * 16 * kAmxTokens + kc * 32, p1 = p0 + 16 * kAmxTokens;
    _tile_loadd(6, vp, dv * 4);
    _tile_loadd(7, vp + 16, dv * 4);
    for (int j = 0; j < p_parts; ++j) {
      const uint16_t* part = a.p[j];
      _tile_loadd(4, part + p0, kAmxTokens * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (RB == 2) {
        _tile_loadd(5, part + p1, kAmxTokens * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, acc, dv * 4);
  _tile_stored(1, acc + 16, dv * 4);
  if constexpr (RB == 2) {
    _tile_stored(2, acc + 16 * dv, dv * 4);
    _tile_stored(3, acc + 16 * dv + 16, dv * 4);
  }
  amx_fence();
}

// task() on tiles (d and dv multiples of 32, values in a buffer of their own): the same rows, the
// same causal limits and left padding, the same online softmax and epilogue.
FL_TARGET_AMX void task_amx(const DecodeParams& p, int64_t b, int64_t h, int64_t qi0, int64_t nq, int64_t g0,
                            int64_t gn, Buffers& w, AmxBuffers& a, int64_t* limit, const KeyRange& kr) {
  const int64_t G = p.hq / p.hkv, d = p.d, groups = d / p.group;
  const int64_t dv = value_dim(p), vrow = value_row(p), vsrow = value_scale_row(p);
  const int64_t rows = nq * gn, head0 = h * G + g0;
  const int64_t rows16 = (rows + 15) / 16 * 16;  // rows padded to whole row blocks
  // The queries split unscaled, the softmax scale applied to the scores: a bf16 query is one exact
  // part, an fp16 one two (11 significant bits), an fp32 one three (24); the probabilities take
  // as many.
  const int parts = p.q != nullptr ? 3 : (p.q16_dtype == DType::kFloat16 ? 2 : 1);
  // values that are the keys' first dv channels (multi-head latent attention's latent): taken from
  // the dequantized key rows
  const bool in_keys = p.v == p.k && p.v_scale == p.k_scale && vrow == d / 2 && vsrow == groups;
  const uint16_t* vb = in_keys ? a.k : a.v;
  const int64_t vs = in_keys ? d : dv;
  for (int64_t r = 0; r < rows16; ++r) {  // (padding rows: no query, no visible key)
    const int64_t i = r / gn, g = r % gn;
    if (r < rows) {
      const int64_t src = query_row(p, b, head0 + g, qi0 + i) * d;
      if (p.q != nullptr) {
        load_query(p.q + src, d, 1.0f, false, w.q + r * d);
      } else if (p.q16_dtype == DType::kFloat16) {
        load_query(static_cast<const half_t*>(p.q16) + src, d, 1.0f, false, w.q + r * d);
      } else {
        load_query(static_cast<const bf16_t*>(p.q16) + src, d, 1.0f, false, w.q + r * d);
      }
      limit[r] = query_limit(p, b, qi0 + i);
    }
    w.m[r] = kNegInf;
    w.l[r] = 0.0f;
    for (int64_t c = 0; c < dv; ++c) a.acc[r * dv + c] = 0.0f;
  }
  if (parts == 1) stage_queries<1>(w.q, rows, rows16, d, a.q);
  else if (parts == 2) stage_queries<2>(w.q, rows, rows16, d, a.q);
  else stage_queries<3>(w.q, rows, rows16, d, a.q);
  const TokenRows at = token_rows(p, b, h);
  int64_t begin, keys;
  key_range(first_token(p, b), query_keys(p, b, qi0, nq), kr, begin, keys);
  const __m512i pair_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                           6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i pair_hi = _mm512_add_epi16(pair_lo, _mm512_set1_epi16(16));
  amx_configure();
  for (int64_t t0 = begin; t0 < keys; t0 += kAmxTokens) {
    const int64_t nt = keys - t0 < kAmxTokens ? keys - t0 : kAmxTokens;
    const int64_t nt32 = (nt + 31) / 32 * 32;  // keys in whole 32-key chunks, zeros past nt
    for (int64_t i = 0; i < nt32; ++i) {
      if (i < nt) {
        const int64_t r = at(t0 + i);
        dequant_row_bf16(p.k + r * (d / 2), p.k_scale + r * groups, d, p.group, a.k + i * d);
        if (!in_keys) dequant_row_bf16(p.v + r * vrow, p.v_scale + r * vsrow, dv, p.group, a.v + i * dv);
      } else {
        for (int64_t c = 0; c < d; ++c) a.k[i * d + c] = 0;
        for (int64_t c = 0; c < dv; ++c) a.v[i * dv + c] = 0;
      }
    }
    for (int64_t i = 0; i < nt32 / 2; ++i) {  // values in key pairs
      for (int64_t c = 0; c < dv; c += 32) {
        const __m512i x0 = _mm512_loadu_si512(vb + 2 * i * vs + c), x1 = _mm512_loadu_si512(vb + (2 * i + 1) * vs + c);
        _mm512_storeu_si512(a.v_pairs + i * dv + c, _mm512_permutex2var_epi16(x0, pair_lo, x1));
        _mm512_storeu_si512(a.v_pairs + i * dv + c + 16, _mm512_permutex2var_epi16(x0, pair_hi, x1));
      }
    }
    amx_fence();
    for (int64_t rb = 0; rb < rows16 / 16; rb += 2) {  // scores S^T, into the row blocks of a.s
      for (int64_t kb = 0; kb < nt32 / 16; kb += 2) {
        if (rb + 1 < rows16 / 16) scores_tiles<2>(a, d, parts, kb, rb);
        else scores_tiles<1>(a, d, parts, kb, rb);
      }
    }
    for (int64_t rb = 0; rb < rows16 / 16; ++rb) {  // the online softmax and the probabilities' parts
      alignas(64) int32_t hi[16];  // (each row's visible keys; none for padding rows)
      for (int i = 0; i < 16; ++i) {
        const int64_t r = rb * 16 + i;
        const int64_t n = r < rows ? limit[r] - t0 + 1 : 0;
        hi[i] = static_cast<int32_t>(n < 0 ? 0 : (n > nt ? nt : n));
      }
      float* st = a.s + rb * kAmxTokens * 16;
      const int64_t at = rb * 16 * kAmxTokens;
      float *m = w.m + rb * 16, *l = w.l + rb * 16, *acc = a.acc + rb * 16 * dv;
      if (parts == 1) softmax_block_rows<1>(st, nt32, hi, p.scale, p.softcap, at, a.p, m, l, acc, dv);
      else if (parts == 2) softmax_block_rows<2>(st, nt32, hi, p.scale, p.softcap, at, a.p, m, l, acc, dv);
      else softmax_block_rows<3>(st, nt32, hi, p.scale, p.softcap, at, a.p, m, l, acc, dv);
    }
    amx_fence();
    for (int64_t rb = 0; rb < rows16 / 16; rb += 2) {
      for (int64_t c0 = 0; c0 < dv; c0 += 32) {
        if (rb + 1 < rows16 / 16) values_tiles<2>(a, dv, parts, rb, c0, nt32 / 32);
        else values_tiles<1>(a, dv, parts, rb, c0, nt32 / 32);
      }
    }
  }
  _tile_release();
  finish_task(p, b, head0, qi0, nq, gn, a.acc, w.m, w.l, false, kr);
}
#endif  // FL_AMX

Status decode(const DecodeParams& p) {
#if defined(__AVX2__)
  const bool chunked = p.d % 16 == 0 && value_dim(p) % 16 == 0 && p.group % 16 == 0;
#else
  const bool chunked = false;
#endif
  const int64_t G = p.hq / p.hkv, dv = value_dim(p);
  const int64_t bkv = p.batch * p.hkv, threads = omp_get_max_threads();
  int64_t qblock = kQueryBlock;  // query tokens per task
#if defined(FL_AMX)
  // tasks of >= kAmxMinRows rows on AMX tiles (the level amx_bf16; head sizes in 32-channel blocks)
  const bool amx_shape = active_isa() >= Isa::kAmxBf16 && p.d % 32 == 0 && dv % 32 == 0;
  // there, a prefill's tasks take 64 query tokens where that still gives each thread two tasks:
  // a task dequantizes its keys once for all its rows (1.01-1.09x, means of three A/B runs at 100
  // to 1024 new tokens, GQA 32/8 and 16/2; the fp32-FMA paths gain nothing from it: 0.92-1.09x)
  const int64_t twice = 2 * kQueryBlock;
  if (amx_shape && p.q_tokens > kQueryBlock && bkv * ((p.q_tokens + twice - 1) / twice) >= 2 * threads) {
    qblock = twice;
  }
#endif
  const int64_t qblocks = (p.q_tokens + qblock - 1) / qblock;
  // Decode with fewer (batch, kv head) tasks than threads: the group's heads in slices of what one
  // task's kernel holds (a register tile, kRegisterHeads, where each thread gets at most one such
  // slice: the register path's fixed cost per token is the lower, its cost per head the higher;
  // one 16-row tile block on AMX: multi-head latent attention's 16 heads), then each slice's
  // cached tokens in key ranges (split-KV) for the threads left. With too few tokens to split,
  // as many slices as the threads need (each slice reads the cache bytes again, from cache).
  int64_t slices = 1, splits = 1;
  if (p.q_tokens == 1 && bkv < threads) {
    int64_t per_task = G;
#if defined(__AVX2__)
    if (chunked && bkv * ((G + kRegisterHeads - 1) / kRegisterHeads) <= threads) per_task = kRegisterHeads;
#endif
#if defined(FL_AMX)
    if (amx_shape && G >= kAmxMinRows) per_task = 16;
#endif
    slices = (G + per_task - 1) / per_task;
    const int64_t want = (threads + bkv * slices - 1) / (bkv * slices), most = p.length / kSplitMinKeys;
    splits = want < most ? want : (most > 1 ? most : 1);
    if (splits == 1 && slices == 1) {
      const int64_t want_slices = (threads + bkv - 1) / bkv, most_slices = (G + kHeads - 1) / kHeads;
      slices = want_slices < most_slices ? want_slices : most_slices;
    }
  }
  const int64_t per_slice = (G + slices - 1) / slices;
  slices = (G + per_slice - 1) / per_slice;  // (no empty slice)
  const int64_t units = p.batch * p.hkv * qblocks * slices, tasks = units * splits;
  const int64_t rows = per_slice * (p.q_tokens < qblock ? p.q_tokens : qblock);
  const int64_t stride = rows * (dv + 2);  // floats per partial
  float* partials = splits > 1 ? new float[tasks * stride] : nullptr;
  // (in threads where the call's work pays for waking them: a decode's bytes, a prefill's
  // query rows times keys; a 64-token prefill of 8 heads over its own 64 tokens took 1.7x as long
  // on one thread)
  const int64_t work = units * (p.q_tokens > 1 ? rows : 1) * p.length * (p.d + dv);
#pragma omp parallel if (tasks > 1 && work >= (1 << 17))
  {
    const FlushDenormals ftz;  // (each thread, for the call)
#if defined(FL_AMX)
    const bool amx = amx_shape && rows >= kAmxMinRows;
    const int64_t rows_alloc = amx ? (rows + 31) / 32 * 32 : rows;
    AmxBuffers* a = amx ? new AmxBuffers(rows_alloc, p.d, dv) : nullptr;
#else
    const bool amx = false;
    const int64_t rows_alloc = rows;
#endif
    Buffers w(rows_alloc, p.d, dv);
    int64_t* limit = new int64_t[rows_alloc];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t u = t / splits;  // (batch, kv head, query block, head slice), then key range
      const int64_t bh = u / (qblocks * slices), qb = (u / slices) % qblocks, g0 = (u % slices) * per_slice;
      const int64_t gn = G - g0 < per_slice ? G - g0 : per_slice;
      const int64_t b = bh / p.hkv, h = bh % p.hkv, qi0 = qb * qblock;
      int64_t nq = p.q_tokens - qi0 < qblock ? p.q_tokens - qi0 : qblock;
      // (a row's padding queries, past its query_count: zeros, no task rows; q_tokens > 1)
      const int64_t real = query_rows(p, b, qi0, nq);
      if (real < nq) {
        store_padding(p, b, h * G + g0, qi0 + real, nq - real, gn);
        if (real == 0) continue;
        nq = real;
      }
      const KeyRange kr{t % splits, splits, partials != nullptr ? partials + t * stride : nullptr};
#if defined(FL_AMX)
      if (a != nullptr) {
        task_amx(p, b, h, qi0, nq, g0, gn, w, *a, limit, kr);
        continue;
      }
#endif
      task(p, b, h, qi0, nq, g0, gn, chunked, w, limit, kr);
    }
    // (implicit barrier: every range's partial is written before any merge reads it)
    if (partials != nullptr) {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {  // decode: one query block
        const int64_t bh = u / slices, g0 = (u % slices) * per_slice;
        const int64_t gn = G - g0 < per_slice ? G - g0 : per_slice;
        merge_splits(p, bh / p.hkv, (bh % p.hkv) * G + g0, gn, splits, partials + u * splits * stride, stride,
                     chunked && !amx, w.acc, w.m, w.l);
      }
    }
    delete[] limit;
#if defined(FL_AMX)
    delete a;
#endif
  }
  delete[] partials;
  return Status::ok();
}

}  // namespace fastlayers::cpu::FL_CPU_ISA::kvint4
