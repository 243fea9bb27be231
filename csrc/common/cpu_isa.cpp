// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace fastlayers::cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // NOTE(isa): __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
#if defined(FL_EMULATED_AVX512)
    return Isa::kAvx512;  // test build: the AVX-512 kernels run through SIMDe on AVX2
#else
    return Isa::kAvx2;
#endif
  }
#endif
  return Isa::kScalar;
}

Isa initial_isa() {
  const Isa best = detect();
  const char* env = std::getenv("FASTLAYERS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
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
