// SPDX-License-Identifier: Apache-2.0
// Run-time choice of the CPU kernel variant. Wheels are built without -march=native; each kernel TU is
// compiled once per ISA (cmake/CpuIsa.cmake) and the best one the CPU supports runs.
#pragma once

namespace fastlayers::cpu {

// Levels, each a superset of the one before. kAvx512Bf16 runs the avx512 kernels of every family;
// only the INT4 x FP8 GEMM, the bf16 scores of varlen_attention and the bf16 row dot products of
// the FFF and PEER expert kernels differ there (vdpbf16ps: two exact products per fp32 lane and
// instruction; rows_cpu.h's row_dot). kAmxBf16 (Intel AMX: tile registers and tdpbf16ps, 16 x 16 x
// 32 products per instruction) runs the avx512_bf16 kernels, except the INT4 x FP8 GEMM and the
// INT4 KV attention (common/amx_cpu.h); the OS must grant the process the tile state (Linux
// 5.16+: arch_prctl ARCH_REQ_XCOMP_PERM), which detection asks for.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmxBf16 = 4 };
inline constexpr Isa kIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAmxBf16};

const char* isa_name(Isa isa);
// The best ISA this CPU and OS support.
Isa detected_isa();
// True in a test build whose AVX-512 kernels run through SIMDe (CMake FASTLAYERS_EMULATE_AVX512).
bool avx512_emulated();
// The ISA kernels use now: detected_isa(), or a lower one chosen with set_active_isa() or the
// FASTLAYERS_CPU_ISA environment variable (scalar | avx2 | avx512 | avx512_bf16 | amx_bf16).
Isa active_isa();
// Returns false (and changes nothing) when the CPU does not support `isa`.
bool set_active_isa(Isa isa);

}  // namespace fastlayers::cpu

// Returns fastlayers::cpu::<active ISA>::<family>::fn(p): the one run-time dispatch every family's
// launcher uses (the kernels are compiled once per ISA, see cmake/CpuIsa.cmake).
#define FL_CPU_DISPATCH(family, fn, p)                    \
  switch (::fastlayers::cpu::active_isa()) {             \
    case ::fastlayers::cpu::Isa::kAmxBf16:               \
    case ::fastlayers::cpu::Isa::kAvx512Bf16:            \
    case ::fastlayers::cpu::Isa::kAvx512:                \
      return ::fastlayers::cpu::avx512::family::fn(p);   \
    case ::fastlayers::cpu::Isa::kAvx2:                  \
      return ::fastlayers::cpu::avx2::family::fn(p);     \
    default:                                             \
      return ::fastlayers::cpu::scalar::family::fn(p);   \
  }
