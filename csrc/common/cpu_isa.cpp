// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastlayers::cpu {
namespace {

// AMX-BF16 in the CPU and the tile data state granted to this process. Linux keeps the 8 KiB of tile
// registers off by default: a process asks once (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), and a
// tile instruction without the grant is a SIGILL. The grant holds for every thread of the process.
bool amx_bf16_usable() {
#if defined(__linux__) && defined(__x86_64__) && defined(SYS_arch_prctl)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return false;
  unsigned long long granted = 0;
  return syscall(SYS_arch_prctl, kGetXcompPerm, &granted) == 0 && ((granted >> kXtileData) & 1ull) != 0;
#else
  return false;
#endif
}

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
#if defined(FL_EMULATED_AVX512)
  if (avx2) return Isa::kAvx512Bf16;  // test build: every AVX-512 kernel runs through SIMDe on AVX2
#endif
  // NOTE(isa): __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (!__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512;
    return amx_bf16_usable() ? Isa::kAmxBf16 : Isa::kAvx512Bf16;
  }
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa initial_isa() {
  const Isa best = detect();
  const char* env = std::getenv("FASTLAYERS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  for (Isa isa : kIsas) {
    if (std::strcmp(env, isa_name(isa)) == 0 && static_cast<int>(isa) <= static_cast<int>(best)) {
      return isa;
    }
  }
  return best;  // an unknown or unsupported request keeps the best ISA; fastlayers.info() shows it
}

std::atomic<int>& active() {
  static std::atomic<int> value{static_cast<int>(initial_isa())};
  return value;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmxBf16:
      return "amx_bf16";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool avx512_emulated() {
#if defined(FL_EMULATED_AVX512)
  return true;
#else
  return false;
#endif
}

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(detected_isa())) return false;
  active().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

}  // namespace fastlayers::cpu
