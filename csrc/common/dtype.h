// SPDX-License-Identifier: Apache-2.0
// Dtype codes shared with python/fastlayers/_dtypes.py, and exact scalar conversions for the CPU
// kernels (round-to-nearest-even, as torch rounds).
//
// NOTE(isa): every function here is `static inline`. This header is compiled into TUs built with
// different -m flags (scalar / AVX2 / AVX-512); internal linkage (and compiler builtins instead of
// <cmath>/<cstring>) keep the linker from picking an
// AVX-512 copy of a helper for code that runs on a CPU without AVX-512.
#pragma once

#include <cstdint>

namespace fastlayers {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat8E4M3 = 3,
  kInt8 = 4,
  kUInt8 = 5,
  kInt32 = 6,
  kInt64 = 7,
};

// Storage types: plain 16/8-bit payloads, no arithmetic. Kernels convert to fp32 to compute.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
struct fp8e4m3_t {
  uint8_t bits;
};

// IsBf16<T>::value: T is bf16_t (no <type_traits> in the per-ISA TUs; a trait has no code).
template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<bf16_t> {
  static constexpr bool value = true;
};

constexpr float kFp8E4M3Max = 448.0f;

static inline uint32_t float_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float bits_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

static inline float to_float(float v) { return v; }

static inline float to_float(bf16_t v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

static inline float to_float(half_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1Fu;
  const uint32_t man = v.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (man << 13));  // inf / nan
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline bf16_t to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(rounded >> 16)};
}

static inline half_t to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return {static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  if (a >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: fp16 subnormal, man = round(|f| * 2^24)
    const uint32_t man = static_cast<uint32_t>(__builtin_nearbyintf(bits_float(a) * 16777216.0f));
    return {static_cast<uint16_t>(sign | man)};  // man == 0x400 encodes the smallest normal
  }
  uint32_t h = ((((a >> 23) - 112u) << 10) | ((a & 0x7FFFFFu) >> 13));
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return {static_cast<uint16_t>(sign | h)};
}

// Saturating (satfinite) round-to-nearest-even: anything past +-448, infinities included, becomes
// +-448, which is what clamp(-448, 448) followed by torch's cast gives; NaN stays NaN.
static inline fp8e4m3_t to_fp8e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return {static_cast<uint8_t>(sign | 0x7Fu)};
  if (a < 0x3C800000u) {  // below 2^-6: subnormal, code = round(|f| * 2^9); 8 encodes 2^-6
    return {static_cast<uint8_t>(sign | static_cast<uint32_t>(__builtin_nearbyintf(bits_float(a) * 512.0f)))};
  }
  uint32_t q = ((((a >> 23) - 120u) << 3) | ((a & 0x7FFFFFu) >> 20));
  const uint32_t rem = a & 0xFFFFFu;
  if (rem > 0x80000u || (rem == 0x80000u && (q & 1u))) ++q;
  if (q > 0x7Eu) q = 0x7Eu;  // saturate at 448
  return {static_cast<uint8_t>(sign | q)};
}

static inline float to_float(fp8e4m3_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x80u) << 24;
  const uint32_t exp = (v.bits >> 3) & 0xFu;
  const uint32_t man = v.bits & 0x7u;
  if (exp == 0xFu && man == 0x7u) return bits_float(0x7FC00000u | sign);
  if (exp == 0) {
    const float mag = static_cast<float>(man) * 0.001953125f;  // man * 2^-9
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// Round-trip through a storage type: the value a kernel gets after storing f as T and reading it back.
// The activation dtypes the kernels take.
static inline bool is_float_activation(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

static inline float round_to(float f, const float*) { return f; }
static inline float round_to(float f, const bf16_t*) { return to_float(to_bf16(f)); }
static inline float round_to(float f, const half_t*) { return to_float(to_half(f)); }

static inline void store_as(float* p, float v) { *p = v; }
static inline void store_as(bf16_t* p, float v) { *p = to_bf16(v); }
static inline void store_as(half_t* p, float v) { *p = to_half(v); }

}  // namespace fastlayers
