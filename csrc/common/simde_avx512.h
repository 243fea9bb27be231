// SPDX-License-Identifier: Apache-2.0
// Test builds only (CMake option FASTLAYERS_EMULATE_AVX512): the AVX-512 kernels compiled for a
// machine without AVX-512. SIMDe (https://github.com/simd-everywhere/simde, header-only, MIT)
// implements the _mm512_* intrinsics portably; with its native aliases the kernels' source compiles
// unchanged. This file adds the few intrinsics SIMDe 0.8 lacks, each by its documented semantics
// (Intel Intrinsics Guide), lane by lane. Nothing here is fast: the point is that CI runs the
// AVX-512 paths' logic (lane counts, masks, tails, alignment) against the reference.
#pragma once

#include <cstdint>
#include <cstdlib>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>

namespace fastlayers::simde_shim {

// vpmovdw / vpmovdb: each 32-bit lane truncated to the width of Int.
template <typename Int>
void truncate_lanes(simde__m512i a, Int* out) {
  alignas(64) int32_t in[16];
  simde_mm512_store_si512(in, a);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<Int>(static_cast<uint32_t>(in[i]));
}
inline simde__m256i cvtepi32_epi16(simde__m512i a) {
  alignas(32) int16_t out[16];
  truncate_lanes(a, out);
  return simde_mm256_load_si256(reinterpret_cast<const simde__m256i*>(out));
}
inline simde__m128i cvtepi32_epi8(simde__m512i a) {
  alignas(16) int8_t out[16];
  truncate_lanes(a, out);
  return simde_mm_load_si128(reinterpret_cast<const simde__m128i*>(out));
}

inline simde__m512i cvtepu8_epi32(simde__m128i a) {  // vpmovzxbd: zero-extend 16 bytes
  alignas(16) uint8_t in[16];
  alignas(64) int32_t out[16];
  simde_mm_store_si128(reinterpret_cast<simde__m128i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return simde_mm512_load_si512(out);
}

// vcvtps2ph with an immediate rounding mode: the two 8-lane halves through the 256-bit form.
#define FL_SIMDE_CVTPS_PH(a, imm)                                                     \
  ([](simde__m512 v) {                                                                \
    alignas(64) float f[16];                                                          \
    simde_mm512_store_ps(f, v);                                                       \
    alignas(32) int16_t h[16];                                                        \
    simde_mm_store_si128(reinterpret_cast<simde__m128i*>(h),                          \
                         simde_mm256_cvtps_ph(simde_mm256_load_ps(f), (imm)));        \
    simde_mm_store_si128(reinterpret_cast<simde__m128i*>(h + 8),                      \
                         simde_mm256_cvtps_ph(simde_mm256_load_ps(f + 8), (imm)));    \
    return simde_mm256_load_si256(reinterpret_cast<const simde__m256i*>(h));          \
  }(a))

// Non-temporal stores: the same values, and the alignment the native instruction faults without.
inline void check_aligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 64 != 0) std::abort();
}
inline void stream_ps(float* p, simde__m512 a) {
  check_aligned(p);
  simde_mm512_store_ps(p, a);
}
inline void stream_si512(void* p, simde__m512i a) {
  check_aligned(p);
  simde_mm512_store_si512(p, a);
}

// GCC's halving tree: lanes i and i + 8, then i + 4, i + 2, i + 1.
inline float reduce_add_ps(simde__m512 a) {
  alignas(64) float t[16];
  simde_mm512_store_ps(t, a);
  for (int w = 8; w > 0; w /= 2) {
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  }
  return t[0];
}

}  // namespace fastlayers::simde_shim

#define _mm512_cvtepi32_epi16(a) ::fastlayers::simde_shim::cvtepi32_epi16(a)
#define _mm512_cvtepi32_epi8(a) ::fastlayers::simde_shim::cvtepi32_epi8(a)
#define _mm512_cvtepu8_epi32(a) ::fastlayers::simde_shim::cvtepu8_epi32(a)
#define _mm512_cvtps_ph(a, imm) FL_SIMDE_CVTPS_PH(a, imm)
#define _mm512_stream_ps(p, a) ::fastlayers::simde_shim::stream_ps(p, a)
#define _mm512_stream_si512(p, a) ::fastlayers::simde_shim::stream_si512(p, a)
#define _mm512_reduce_add_ps(a) ::fastlayers::simde_shim::reduce_add_ps(a)
