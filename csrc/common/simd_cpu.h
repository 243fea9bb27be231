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
#endif

#include "common/dtype.h"

namespace fastlayers::cpu::FL_CPU_ISA {

#if defined(__AVX512F__)

constexpr int kW = 16;
struct V {
  __m512 v;
};
static inline V vzero() { return {_mm512_setzero_ps()}; }
static inline V vset1(float f) { return {_mm512_set1_ps(f)}; }
static inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
static inline V vabs(V a) { return {_mm512_abs_ps(a.v)}; }
static inline float vsum(V a) { return _mm512_reduce_add_ps(a.v); }
static inline float vmaxval(V a) { return _mm512_reduce_max_ps(a.v); }

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
static inline float vsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
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
static inline float vmaxval(V a) { return a.v; }
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

#endif

}  // namespace fastlayers::cpu::FL_CPU_ISA
