// SPDX-License-Identifier: Apache-2.0
// A minimal fp32 SIMD layer for the CPU kernels: kW lanes of fp32, loads that widen fp16/bf16/fp32 and
// stores that round to nearest even. The ISA comes from the compiler flags of the including TU
// (cmake/CpuIsa.cmake), and everything lives in namespace fastlayers::cpu::FL_CPU_ISA.
#pragma once

#ifndef FL_CPU_ISA
#error "simd_cpu.h is only for the per-ISA kernel TUs (FL_CPU_ISA is set by cmake/CpuIsa.cmake)"
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

// FL_AVX512 selects the AVX-512 code paths. FL_SIMDE_AVX512 (test builds only: the CMake option
// FASTLAYERS_EMULATE_AVX512) compiles them for a machine without AVX-512 through SIMDe's portable
// implementations of the same intrinsics, so that CI runs their logic against the reference;
// release builds use the native instructions.
#if defined(FL_SIMDE_AVX512)
#include "common/simde_avx512.h"
#define FL_AVX512 1
#elif defined(__AVX512F__)
#define FL_AVX512 1
#endif

#include "common/dtype.h"

// Functions that use AVX512-BF16 (vdpbf16ps) inside an AVX-512 TU, called only at the ISA level
// avx512_bf16 (cpu_isa.h). Under SIMDe the instruction is emulated and the TU targets AVX2.
#if defined(FL_SIMDE_AVX512)
#define FL_TARGET_BF16
#elif defined(FL_AVX512)
#define FL_TARGET_BF16 __attribute__((target("avx512bf16")))
#endif

namespace fastlayers::cpu::FL_CPU_ISA {

#if defined(FL_AVX512)

constexpr int kW = 16;
struct V {
  __m512 v;
};
// v[i] (i < 16: 16 rows of 16 lanes) transposed in place: lane j of v[i] becomes lane i of v[j].
static inline void transpose16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // v[i + q], 128-bit lane l: column 4 l + q of rows i .. i + 3
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i s0 = _mm512_shuffle_i32x4(v[q], v[4 + q], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(v[q], v[4 + q], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(v[8 + q], v[12 + q], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(v[8 + q], v[12 + q], 0xEE);
    t[q] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    t[4 + q] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    t[8 + q] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    t[12 + q] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

static inline V vzero() { return {_mm512_setzero_ps()}; }
static inline V vset1(float f) { return {_mm512_set1_ps(f)}; }
static inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
static inline V vabs(V a) { return {_mm512_abs_ps(a.v)}; }
// The sum of a's lanes by a fixed tree: lanes i + (i + 8), then + (i + 4), + (i + 2), + (i + 1)
// (the tree of GCC's _mm512_reduce_add_ps), written out so that vsum8 can follow it exactly.
static inline float vsum(V a) {
  const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(a.v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  const __m128 w = _mm_add_ps(u, _mm_movehl_ps(u, u));
  return _mm_cvtss_f32(_mm_add_ss(w, _mm_movehdup_ps(w)));
}
// out[j] = vsum(a[j]), j < 8, bit for bit: the same additions, done for eight vectors at once
// (16 shuffles and 8 adds instead of 32 and 32). Always inlined: GCC kept it a call, its eight
// accumulators passed through memory (the INT4 KV prefill's scores 1.2-1.4x as long).
__attribute__((always_inline)) static inline void vsum8(const V* a, float* out) {
  __m512 t[4], u[2];
  for (int j = 0; j < 4; ++j) {  // t[j]: [lanes i + (i + 8) of a[2j] | of a[2j + 1]], i < 8
    t[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j].v, a[2 * j + 1].v, 0x44),
                         _mm512_shuffle_f32x4(a[2 * j].v, a[2 * j + 1].v, 0xEE));
  }
  for (int j = 0; j < 2; ++j) {  // u[j], 128-bit block b: a[4j + b]'s i + (i + 4), i < 4
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0xDD));
  }
  // block b: [a[b]'s i + (i + 2), i < 2 | a[b + 4]'s], then lane pairs: lanes 4b and 4b + 2 hold
  // a[b]'s and a[b + 4]'s sums.
  const __m512 w = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(u[0]), _mm512_castps_pd(u[1]))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(u[0]), _mm512_castps_pd(u[1]))));
  const __m512 r = _mm512_add_ps(w, _mm512_shuffle_ps(w, w, _MM_SHUFFLE(3, 3, 1, 1)));  // (+ lane 2m + 1)
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r)));
}
static inline float vmaxval(V a) { return _mm512_reduce_max_ps(a.v); }
static inline int vgt_mask(V a, V b) { return static_cast<int>(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)); }

static inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline V vload(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
static inline V vload(const half_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
static inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
static inline __m512i bf16_rne_bits(V a) {  // fp32 -> bf16 in the low 16 bits of each lane
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}
static inline void vstore(bf16_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_rne_bits(a)));
}
static inline void vstore(half_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
static inline V vround(V a, const float*) { return a; }
static inline V vround(V a, const bf16_t*) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(bf16_rne_bits(a), 16))};
}
static inline V vround(V a, const half_t*) {
  return {_mm512_cvtph_ps(_mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT))};
}
// The same roundings for values known not to be NaN (inf and overflow to inf round correctly): the
// bf16 forms skip the NaN blend, which is a third of their work.
static inline __m512i bf16_rne_hi_nonan(V a) {  // the rounded bf16 in the high 16 bits, low bits 0
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, lsb), _mm512_set1_epi32(0x7FFF));
  return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
static inline V vround_nonan(V a, const float*) { return a; }
static inline V vround_nonan(V a, const half_t* t) { return vround(a, t); }
static inline V vround_nonan(V a, const bf16_t*) { return {_mm512_castsi512_ps(bf16_rne_hi_nonan(a))}; }
static inline void vstore_nonan(float* p, V a) { vstore(p, a); }
static inline void vstore_nonan(half_t* p, V a) { vstore(p, a); }
static inline void vstore_nonan(bf16_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rne_hi_nonan(a), 16)));
}
// bf16 pairs in unpack order: 2*kW bf16 as two fp32 vectors with one load and two unpacks (instead
// of two widening loads); lo holds elements 8L+0..3 and hi 8L+4..7 of each 128-bit lane L, and
// vstore_pair_nonan's packus puts them back in natural order. Elementwise partners (the weight)
// must be in the same order: pair_natural_index(k, hi) is the natural index of lane element k.
#define FL_HAS_BF16_PAIRS 1
static inline int pair_natural_index(int k, bool hi) { return (k / 4) * 8 + (hi ? 4 : 0) + k % 4; }
static inline void vload_pair(const bf16_t* p, V& lo, V& hi) {
  const __m512i w = _mm512_loadu_si512(p);
  lo = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), w))};
  hi = {_mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), w))};
}
static inline __m512i bf16_rne_lo_nonan(V a) {  // the rounded bf16 in the low 16 bits, high bits 0
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, lsb), _mm512_set1_epi32(0x7FFF)), 16);
}
static inline void vstore_pair_nonan(bf16_t* p, V lo, V hi) {
  _mm512_storeu_si512(p, _mm512_packus_epi32(bf16_rne_lo_nonan(lo), bf16_rne_lo_nonan(hi)));
}
// Non-temporal (streaming) stores for outputs too large to stay in cache: no read-for-ownership of
// the destination line, a third less memory traffic for a read-once write-once kernel. p must be
// aligned to the store (kStreamAlign covers all of them); stream_fence() before others read.
constexpr int kStreamAlign = 64;
static inline void vstream(float* p, V a) { _mm512_stream_ps(p, a.v); }
static inline void vstream(half_t* p, V a) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
static inline void vstream(bf16_t* p, V a) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_rne_bits(a)));
}
static inline void vstream_nonan(float* p, V a) { vstream(p, a); }
static inline void vstream_nonan(half_t* p, V a) { vstream(p, a); }
static inline void vstream_nonan(bf16_t* p, V a) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_rne_lo_nonan(a)));
}
static inline void vstream_pair_nonan(bf16_t* p, V lo, V hi) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_packus_epi32(bf16_rne_lo_nonan(lo), bf16_rne_lo_nonan(hi)));
}
static inline V vdiv(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
// e^x = 2^n p for x in fp32's range: n = round(x log2 e), p = e^r by a degree-6 polynomial in
// r = x - n ln 2 (ln 2 in two parts); returns p, n in `n`.
static inline __m512 exp_parts(__m512 x, __m512& n) {
  n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  return _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
}
// e^a, about 2 ulp over the fp32 range; below -87.3 (and -inf) gives 0, NaN stays NaN.
static inline V vexp(V a) {
  const __m512 x = _mm512_max_ps(_mm512_min_ps(a.v, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
  __m512 n;
  const __m512 p = exp_parts(x, n);
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(-87.3365478515625f), _CMP_LT_OQ), y, _mm512_setzero_ps());
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), y, a.v)};
}
// Clamp to +-448 (NaN stays NaN) and round to e4m3 codes, as to_fp8e4m3 in dtype.h does.
static inline void vstore(fp8e4m3_t* p, V a) {
  const __m512 c = _mm512_max_ps(_mm512_set1_ps(-kFp8E4M3Max), _mm512_min_ps(_mm512_set1_ps(kFp8E4M3Max), a.v));
  const __m512i u = _mm512_castps_si512(c);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
  const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1));
  __m512i normal = _mm512_srli_epi32(_mm512_add_epi32(mag, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFFF))), 20);
  normal = _mm512_min_epi32(_mm512_sub_epi32(normal, _mm512_set1_epi32(120 << 3)), _mm512_set1_epi32(0x7E));
  const __m512 absf = _mm512_castsi512_ps(mag);
  const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(absf, _mm512_set1_ps(512.0f)));
  __m512i code = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(absf, _mm512_set1_ps(0.015625f), _CMP_LT_OQ), normal, sub);
  code = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q), code, _mm512_set1_epi32(0x7F));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_or_si512(code, sign)));
}
// The FP8-E4M3 value vstore(fp8e4m3_t*) would store, as a float (no codes): the fp32 bits rounded to
// nearest-even at bit 20 in the normal range, round(|v| * 2^9) / 2^9 below 2^-6; NaN stays NaN.
static inline V vround_fp8(V a) {
  const __m512 c = _mm512_max_ps(_mm512_set1_ps(-kFp8E4M3Max), _mm512_min_ps(_mm512_set1_ps(kFp8E4M3Max), a.v));
  const __m512i u = _mm512_castps_si512(c);
  const __m512i sign = _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1));
  const __m512i normal = _mm512_and_si512(_mm512_add_epi32(mag, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFFF))),
                                          _mm512_set1_epi32(static_cast<int>(0xFFF00000u)));
  const __m512 absf = _mm512_castsi512_ps(mag);
  const __m512 sub = _mm512_mul_ps(
      _mm512_roundscale_ps(_mm512_mul_ps(absf, _mm512_set1_ps(512.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _mm512_set1_ps(0.001953125f));
  __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(absf, _mm512_set1_ps(0.015625f), _CMP_LT_OQ),
                                  _mm512_castsi512_ps(normal), sub);
  r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q), r, c)};
}
static inline V vmin(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
// a < b ? x : y per lane (false for a NaN in a or b: y)
static inline V vselect_lt(V a, V b, V x, V y) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), y.v, x.v)};
}
static inline V vrint(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
static inline bool vany_nan(V a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q) != 0; }
static inline V vzero_nan(V a) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), a.v, _mm512_setzero_ps())};
}
static inline void vstore_i32(int32_t* p, V a) {  // a's lanes hold integers
  _mm512_storeu_si512(p, _mm512_cvttps_epi32(a.v));
}
// a's lanes hold integers in [-8, 7]: kW / 2 bytes of INT4 pairs, lane 2j in the low nibble of byte
// j (two's complement), lane 2j + 1 in its high nibble. (Each 64-bit lane makes one byte in its low
// dword, the high one zero; vpmovdb then a 16-bit pack keep those bytes.)
static inline void vstore_nibbles(uint8_t* p, V a) {
  const __m512i q = _mm512_cvttps_epi32(a.v);
  const __m512i lo = _mm512_and_si512(q, _mm512_set1_epi64(0x0F));
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi64(q, 28), _mm512_set1_epi64(0xF0));
  const __m128i words = _mm512_cvtepi32_epi8(_mm512_or_si512(lo, hi));  // byte j in 16-bit lane j
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(words, words));
}

#elif defined(__AVX2__)

constexpr int kW = 8;
struct V {
  __m256 v;
};
static inline V vzero() { return {_mm256_setzero_ps()}; }
static inline V vset1(float f) { return {_mm256_set1_ps(f)}; }
static inline V vadd(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline V vmul(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline V vmax(V a, V b) { return {_mm256_max_ps(a.v, b.v)}; }
static inline V vabs(V a) {
  return {_mm256_and_ps(a.v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)))};
}
// The sum of a's lanes by a fixed tree: lanes i + (i + 1), then + (i + 2), + (i + 4) (the tree of
// vsum8's hadds, so that the two agree bit for bit).
static inline float vsum(V a) {
  __m256 t = _mm256_add_ps(a.v, _mm256_permute_ps(a.v, _MM_SHUFFLE(2, 3, 0, 1)));
  t = _mm256_add_ps(t, _mm256_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
// out[j] = vsum(a[j]), j < 8, bit for bit: one transposing reduction (six hadds, two permutes, an
// add) instead of eight horizontal sums.
static inline void vsum8(const V* a, float* out) {
  const __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v), t1 = _mm256_hadd_ps(a[2].v, a[3].v);
  const __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v), t3 = _mm256_hadd_ps(a[6].v, a[7].v);
  // u0 = [a0..a3 over their low 128-bit halves | a0..a3 over their high halves]; u1: a4..a7
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
// Bit i set where a[i] > b[i] (false for NaN).
static inline int vgt_mask(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)); }
static inline float vmaxval(V a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline V vload(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline V vload(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
static inline V vload(const half_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
static inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a.v); }
static inline __m256i bf16_rne_bits(V a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, quiet, nan);
}
static inline void vstore(bf16_t* p, V a) {
  // packus works per 128-bit lane; the permute gathers the two useful quarters.
  const __m256i b = bf16_rne_bits(a);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
static inline void vstore(half_t* p, V a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
static inline V vround(V a, const float*) { return a; }
static inline V vround(V a, const bf16_t*) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_rne_bits(a), 16))};
}
static inline V vround(V a, const half_t*) {
  return {_mm256_cvtph_ps(_mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT))};
}
// The same roundings for values known not to be NaN (inf and overflow to inf round correctly): the
// bf16 forms skip the NaN blend, which is a third of their work.
static inline __m256i bf16_rne_hi_nonan(V a) {  // the rounded bf16 in the high 16 bits, low bits 0
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, lsb), _mm256_set1_epi32(0x7FFF));
  return _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
static inline V vround_nonan(V a, const float*) { return a; }
static inline V vround_nonan(V a, const half_t* t) { return vround(a, t); }
static inline V vround_nonan(V a, const bf16_t*) { return {_mm256_castsi256_ps(bf16_rne_hi_nonan(a))}; }
static inline void vstore_nonan(float* p, V a) { vstore(p, a); }
static inline void vstore_nonan(half_t* p, V a) { vstore(p, a); }
static inline void vstore_nonan(bf16_t* p, V a) {
  const __m256i b = _mm256_srli_epi32(bf16_rne_hi_nonan(a), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// bf16 pairs in unpack order (see the AVX-512 block): lo holds elements 8L+0..3, hi 8L+4..7 of
// each 128-bit lane L; vstore_pair_nonan's packus restores the natural order without a permute.
#define FL_HAS_BF16_PAIRS 1
static inline int pair_natural_index(int k, bool hi) { return (k / 4) * 8 + (hi ? 4 : 0) + k % 4; }
static inline void vload_pair(const bf16_t* p, V& lo, V& hi) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = {_mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), w))};
  hi = {_mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), w))};
}
static inline __m256i bf16_rne_lo_nonan(V a) {  // the rounded bf16 in the low 16 bits, high bits 0
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, lsb), _mm256_set1_epi32(0x7FFF)), 16);
}
static inline void vstore_pair_nonan(bf16_t* p, V lo, V hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(bf16_rne_lo_nonan(lo), bf16_rne_lo_nonan(hi)));
}
// Non-temporal (streaming) stores (see the AVX-512 block): p aligned to the store, at most 32 bytes.
constexpr int kStreamAlign = 32;
static inline void vstream(float* p, V a) { _mm256_stream_ps(p, a.v); }
static inline void vstream(half_t* p, V a) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
static inline void vstream_bf16_bits(bf16_t* p, __m256i b) {  // b: bf16 in the low 16 bits
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
static inline void vstream(bf16_t* p, V a) { vstream_bf16_bits(p, bf16_rne_bits(a)); }
static inline void vstream_nonan(float* p, V a) { vstream(p, a); }
static inline void vstream_nonan(half_t* p, V a) { vstream(p, a); }
static inline void vstream_nonan(bf16_t* p, V a) { vstream_bf16_bits(p, bf16_rne_lo_nonan(a)); }
static inline void vstream_pair_nonan(bf16_t* p, V lo, V hi) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(bf16_rne_lo_nonan(lo), bf16_rne_lo_nonan(hi)));
}
static inline V vdiv(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
// e^a, about 2 ulp over the fp32 range; below -87.3 (and -inf) gives 0, NaN stays NaN.
static inline V vexp(V a) {
  const __m256 x = _mm256_max_ps(_mm256_min_ps(a.v, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(a.v, _mm256_set1_ps(-87.3365478515625f), _CMP_LT_OQ));
  return {_mm256_blendv_ps(y, a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}
// Clamp to +-448 (NaN stays NaN) and round to e4m3 codes, as to_fp8e4m3 in dtype.h does:
// normal range by rounding the fp32 bits at bit 20, subnormals (< 2^-6) as round(|v| * 2^9).
static inline void vstore(fp8e4m3_t* p, V a) {
  const __m256 c = _mm256_max_ps(_mm256_set1_ps(-kFp8E4M3Max), _mm256_min_ps(_mm256_set1_ps(kFp8E4M3Max), a.v));
  const __m256i u = _mm256_castps_si256(c);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1));
  __m256i normal = _mm256_srli_epi32(_mm256_add_epi32(mag, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFFF))), 20);
  normal = _mm256_min_epi32(_mm256_sub_epi32(normal, _mm256_set1_epi32(120 << 3)), _mm256_set1_epi32(0x7E));
  const __m256 absf = _mm256_castsi256_ps(mag);
  const __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(absf, _mm256_set1_ps(512.0f)));
  const __m256i is_sub = _mm256_castps_si256(_mm256_cmp_ps(absf, _mm256_set1_ps(0.015625f), _CMP_LT_OQ));
  __m256i code = _mm256_blendv_epi8(normal, sub, is_sub);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(c, c, _CMP_UNORD_Q));
  code = _mm256_or_si256(_mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), nan), sign);
  const __m256i b16 = _mm256_packus_epi32(code, code);
  const __m256i b8 = _mm256_packus_epi16(b16, b16);  // lane i: its four codes in bytes 0..3
  const uint64_t lo = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(b8)));
  const uint64_t hi = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(b8, 1)));
  const uint64_t packed = lo | (hi << 32);
  __builtin_memcpy(p, &packed, sizeof(packed));
}
// The FP8-E4M3 value vstore(fp8e4m3_t*) would store, as a float (no codes): the fp32 bits rounded to
// nearest-even at bit 20 in the normal range, round(|v| * 2^9) / 2^9 below 2^-6; NaN stays NaN.
static inline V vround_fp8(V a) {
  const __m256 c = _mm256_max_ps(_mm256_set1_ps(-kFp8E4M3Max), _mm256_min_ps(_mm256_set1_ps(kFp8E4M3Max), a.v));
  const __m256i u = _mm256_castps_si256(c);
  const __m256i sign = _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1));
  const __m256i normal = _mm256_and_si256(_mm256_add_epi32(mag, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFFF))),
                                          _mm256_set1_epi32(static_cast<int>(0xFFF00000u)));
  const __m256 absf = _mm256_castsi256_ps(mag);
  const __m256 sub = _mm256_mul_ps(
      _mm256_round_ps(_mm256_mul_ps(absf, _mm256_set1_ps(512.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _mm256_set1_ps(0.001953125f));
  __m256 r = _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub, _mm256_cmp_ps(absf, _mm256_set1_ps(0.015625f), _CMP_LT_OQ));
  r = _mm256_or_ps(r, _mm256_castsi256_ps(sign));
  return {_mm256_blendv_ps(r, c, _mm256_cmp_ps(c, c, _CMP_UNORD_Q))};
}
static inline V vmin(V a, V b) { return {_mm256_min_ps(a.v, b.v)}; }
// a < b ? x : y per lane (false for a NaN in a or b: y)
static inline V vselect_lt(V a, V b, V x, V y) {
  return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))};
}
static inline V vrint(V a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
static inline bool vany_nan(V a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)) != 0; }
static inline V vzero_nan(V a) {
  return {_mm256_blendv_ps(a.v, _mm256_setzero_ps(), _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}
static inline void vstore_i32(int32_t* p, V a) {  // a's lanes hold integers
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_cvttps_epi32(a.v));
}
// a's lanes hold integers in [-8, 7]: kW / 2 bytes of INT4 pairs, lane 2j in the low nibble of byte
// j (two's complement), lane 2j + 1 in its high nibble. (Each 64-bit lane makes one byte; a byte
// shuffle gathers each 128-bit half's two.)
static inline void vstore_nibbles(uint8_t* p, V a) {
  const __m256i q = _mm256_cvttps_epi32(a.v);
  const __m256i lo = _mm256_and_si256(q, _mm256_set1_epi64x(0x0F));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi64(q, 28), _mm256_set1_epi64x(0xF0));
  const __m256i take = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(_mm256_or_si256(lo, hi), take);
  const uint32_t word = static_cast<uint32_t>(_mm256_extract_epi16(b, 0) & 0xFFFF) |
                        (static_cast<uint32_t>(_mm256_extract_epi16(b, 8) & 0xFFFF) << 16);
  __builtin_memcpy(p, &word, sizeof(word));
}

#else  // scalar: one lane; the compiler may still vectorise the surrounding loops with SSE2

constexpr int kW = 1;
struct V {
  float v;
};
static inline V vzero() { return {0.0f}; }
static inline V vset1(float f) { return {f}; }
static inline V vadd(V a, V b) { return {a.v + b.v}; }
static inline V vmul(V a, V b) { return {a.v * b.v}; }
static inline V vfma(V a, V b, V c) { return {a.v * b.v + c.v}; }
static inline V vmax(V a, V b) { return {a.v > b.v ? a.v : b.v}; }
static inline V vabs(V a) { return {__builtin_fabsf(a.v)}; }
static inline float vsum(V a) { return a.v; }
static inline void vsum8(const V* a, float* out) {
  for (int j = 0; j < 8; ++j) out[j] = a[j].v;
}
static inline float vmaxval(V a) { return a.v; }
static inline int vgt_mask(V a, V b) { return a.v > b.v ? 1 : 0; }
template <typename T>
static inline V vload(const T* p) {
  return {to_float(*p)};
}
template <typename T>
static inline void vstore(T* p, V a) {
  store_as(p, a.v);
}
template <typename T>
static inline V vround(V a, const T* tag) {
  return {round_to(a.v, tag)};
}
template <typename T>
static inline V vround_nonan(V a, const T* tag) {
  return {round_to(a.v, tag)};
}
template <typename T>
static inline void vstore_nonan(T* p, V a) {
  store_as(p, a.v);
}
// No streaming stores in the scalar build: plain stores under the same names.
constexpr int kStreamAlign = 1;
template <typename T>
static inline void vstream(T* p, V a) {
  store_as(p, a.v);
}
template <typename T>
static inline void vstream_nonan(T* p, V a) {
  store_as(p, a.v);
}
static inline V vdiv(V a, V b) { return {a.v / b.v}; }
static inline V vexp(V a) { return {__builtin_expf(a.v)}; }
static inline void vstore(fp8e4m3_t* p, V a) { *p = to_fp8e4m3(a.v); }
static inline V vround_fp8(V a) { return {to_float(to_fp8e4m3(a.v))}; }
static inline V vmin(V a, V b) { return {a.v < b.v ? a.v : b.v}; }
static inline V vselect_lt(V a, V b, V x, V y) { return {a.v < b.v ? x.v : y.v}; }
static inline V vrint(V a) { return {__builtin_nearbyintf(a.v)}; }
static inline bool vany_nan(V a) { return a.v != a.v; }
static inline V vzero_nan(V a) { return {a.v != a.v ? 0.0f : a.v}; }
static inline void vstore_i32(int32_t* p, V a) { *p = static_cast<int32_t>(a.v); }
// (kW / 2 = 0 bytes: one lane makes no whole byte; the callers pair scalar values themselves)
static inline void vstore_nibbles(uint8_t*, V) {}

#endif

// Orders this thread's non-temporal stores before what follows (the join that lets others read).
static inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Denormals flushed to zero (FTZ) and read as zero (DAZ) on this thread while the object lives,
// its MXCSR restored after. The attention kernels' online softmax makes denormal probabilities,
// rescale factors and partial sums when scores lie more than 87 apart, and x86 computes on
// denormals through microcode assists (the INT4 decode ran 1.3x slower with such scores); values
// below 2^-126 are then 0, which no fp32 or 16-bit output of these kernels can show.
struct FlushDenormals {
#if defined(__SSE2__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

}  // namespace fastlayers::cpu::FL_CPU_ISA
