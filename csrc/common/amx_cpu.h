// SPDX-License-Identifier: Apache-2.0
// Intel AMX (tile registers, tdpbf16ps) for the kernels of the ISA level amx_bf16 (cpu_isa.h), inside
// the AVX-512 build. Not under SIMDe: AMX has no emulation, and the level is never detected there.
//
// tdpbf16ps tmm_c, tmm_a, tmm_b: C[16 x 16] fp32 += A[16 x 32] . B[32 x 16] from bf16, where B is
// stored in pairs ([k / 2][n][2]: a row of B is 16 dwords, each the two k of one column). The
// products are exact (8-bit significands), each added into the fp32 sum as in vdpbf16ps; denormal
// inputs and results flush to zero. Every kernel here configures the eight tiles as 16 rows of 64
// bytes (amx_configure) and releases them (_tile_release) before its thread leaves.
//
// The GCC tile intrinsics are asm statements without a memory clobber: amx_fence() tells the
// compiler that a tile load reads what the code before it stored, and that a tile store wrote
// memory the code after it reads.
#pragma once

#include "common/simd_cpu.h"

#if defined(FL_AVX512) && !defined(FL_SIMDE_AVX512) && defined(__x86_64__)
#define FL_AMX 1
#define FL_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512f")))

namespace fastlayers::cpu::FL_CPU_ISA {

static inline void amx_fence() { __asm__ __volatile__("" ::: "memory"); }

// 32 values of 16 packed INT4 bytes (low nibble first: natural order) looked up in a 16-entry bf16
// table (words 0-15 of `table`), the A-tile row the INT4 kernels decode: each byte widens to a
// dword whose two words take its two nibbles ((v | v << 12) & 0x000F000F), and one vpermw picks
// the table values.
static inline __m512i int4_lookup_bf16(const uint8_t* bytes, __m512i table) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i idx = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
  return _mm512_permutexvar_epi16(idx, table);
}

// The eight tiles as 16 rows x 64 bytes (palette 1), for this thread.
FL_TARGET_AMX static inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg = {};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  amx_fence();
  _tile_loadconfig(&cfg);
}

}  // namespace fastlayers::cpu::FL_CPU_ISA
#endif
