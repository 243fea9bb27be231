// SPDX-License-Identifier: Apache-2.0
// Row primitives for the per-ISA CPU kernels that gather whole rows by index (FFF, PEER): a dot
// product with four independent accumulators (bf16 rows by vdpbf16ps at the level avx512_bf16:
// row_dot), a scaled row added into an fp32 accumulator, and a
// prefetch of a row's cache lines; also an online-softmax step, a row scale and the FP8 value
// table. Lives in namespace fastlayers::cpu::FL_CPU_ISA like simd_cpu.h.
// NOTE(isa): internal linkage only (anonymous namespace), see cmake/CpuIsa.cmake.
#pragma once

#include "common/cpu_isa.h"
#include "common/simd_cpu.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastlayers::cpu::FL_CPU_ISA {
namespace {

template <typename A, typename B>
float dot(const A* a, const B* b, int64_t n) {
  V s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    s0 = vfma(vload(a + i), vload(b + i), s0);
    s1 = vfma(vload(a + i + kW), vload(b + i + kW), s1);
    s2 = vfma(vload(a + i + 2 * kW), vload(b + i + 2 * kW), s2);
    s3 = vfma(vload(a + i + 3 * kW), vload(b + i + 3 * kW), s3);
  }
  for (; i + kW <= n; i += kW) s0 = vfma(vload(a + i), vload(b + i), s0);
  float s = vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
  for (; i < n; ++i) s += to_float(a[i]) * to_float(b[i]);
  return s;
}

#if defined(FL_AVX512)
// a . b for bf16 rows by vdpbf16ps: two exact products per fp32 lane and step (dot's products,
// summed in another order). Only at the ISA level avx512_bf16 (bf16_dots).
[[maybe_unused]] FL_TARGET_BF16 float dot_bf16(const bf16_t* a, const bf16_t* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
    s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(a + i + 32), (__m512bh)_mm512_loadu_si512(b + i + 32));
    s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_loadu_si512(a + i + 64), (__m512bh)_mm512_loadu_si512(b + i + 64));
    s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_loadu_si512(a + i + 96), (__m512bh)_mm512_loadu_si512(b + i + 96));
  }
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
  }
  if (i < n) {  // the tail, copied into zero-padded vectors (a zero product adds nothing); not a
                // masked load, which SIMDe emulates with a full-width read past the rows
    uint16_t ta[32] = {}, tb[32] = {};
    for (int64_t j = 0; i + j < n; ++j) {
      ta[j] = a[i + j].bits;
      tb[j] = b[i + j].bits;
    }
    s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(ta), (__m512bh)_mm512_loadu_si512(tb));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}
#endif

// Whether bf16 dot products take vdpbf16ps (bf16 rows at the ISA level avx512_bf16).
template <typename T>
bool bf16_dots() {
#if defined(FL_AVX512)
  return IsBf16<T>::value && active_isa() >= Isa::kAvx512Bf16;
#else
  return false;
#endif
}

// a . b, by vdpbf16ps when `pairs` (bf16_dots()).
template <typename T>
float row_dot(const T* a, const T* b, int64_t n, bool pairs) {
#if defined(FL_AVX512)
  if constexpr (IsBf16<T>::value) {
    if (pairs) return dot_bf16(a, b, n);
  }
#endif
  (void)pairs;
  return dot(a, b, n);
}

// acc[0..n) += s * row[0..n)
template <typename T>
void axpy(float s, const T* row, float* acc, int64_t n) {
  const V vs = vset1(s);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(acc + i, vfma(vs, vload(row + i), vload(acc + i)));
  for (; i < n; ++i) acc[i] += s * to_float(row[i]);
}

template <typename T>
void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// tanh(x) = x (1 + x^2 (c3 + x^2 (c5 + ...))), its Taylor polynomial to x^9: within 1e-8 relative
// of tanh for |x| < 0.25, where (e - 1) / (e + 1) below loses the digits of e - 1 to cancellation.
constexpr float kTanhC3 = -1.0f / 3.0f, kTanhC5 = 2.0f / 15.0f, kTanhC7 = -17.0f / 315.0f,
                kTanhC9 = 62.0f / 2835.0f;

// Logit soft-capping of s[0, n): s = cap * tanh(s / cap). tanh(x) is (e - 1) / (e + 1) with
// e = exp(2x) and 2x clamped to +-18 (tanh is 1 in fp32 from 9.01 on), but the Taylor polynomial
// above for |x| < 0.25: a few fp32 ulps relative everywhere (the quotient alone has an absolute
// error of ~1e-7, which cap times made 1e-7 cap of error in a small score: 0.1 at cap 1e6).
// NaN stays NaN (the clamps return their second operand for NaN; the select takes the quotient),
// +-inf become +-cap.
[[maybe_unused]] void softcap_row(float* s, int64_t n, float cap) {
  const float inv = 1.0f / cap;
  const V vinv = vset1(inv), vcap = vset1(cap), one = vset1(1.0f), minus_one = vset1(-1.0f);
  const V lo = vset1(-9.0f), hi = vset1(9.0f), small = vset1(0.25f);
  const V c3 = vset1(kTanhC3), c5 = vset1(kTanhC5), c7 = vset1(kTanhC7), c9 = vset1(kTanhC9);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const V x = vmin(hi, vmax(lo, vmul(vload(s + i), vinv)));  // s / cap, clamped to +-9
    const V e = vexp(vadd(x, x));
    const V x2 = vmul(x, x);
    const V poly = vfma(vmul(x, x2), vfma(x2, vfma(x2, vfma(x2, c9, c7), c5), c3), x);
    const V t = vselect_lt(vabs(x), small, poly, vdiv(vadd(e, minus_one), vadd(e, one)));
    vstore(s + i, vmul(vcap, t));
  }
  for (; i < n; ++i) {
    float x = s[i] * inv;
    x = 9.0f < x ? 9.0f : x;  // (comparisons false for NaN: it stays)
    x = -9.0f > x ? -9.0f : x;
    const float x2 = x * x;
    const float e = __builtin_expf(x + x);
    const float t = __builtin_fabsf(x) < 0.25f
                        ? x + x * x2 * (kTanhC3 + x2 * (kTanhC5 + x2 * (kTanhC7 + x2 * kTanhC9)))
                        : (e - 1.0f) / (e + 1.0f);
    s[i] = cap * t;
  }
}

// One online-softmax step for one row of a score block (flash attention): s[lo, hi) becomes
// exp(s - m_new) and the rest of s[0, n) zero; the running max m and sum l are updated, and the
// row's running output must then be scaled by the returned factor exp(m_old - m_new) (0 while
// nothing was seen). An empty range leaves m and l as they are and returns 1.
[[maybe_unused]] float softmax_block(float* s, int64_t n, int64_t lo, int64_t hi, float& m, float& l) {
  if (lo >= hi) {
    for (int64_t i = 0; i < n; ++i) s[i] = 0.0f;
    return 1.0f;
  }
  float mx = -__builtin_inff();
  int64_t i = lo;
  if (i + kW <= hi) {
    V vmx = vload(s + i);
    for (i += kW; i + kW <= hi; i += kW) vmx = vmax(vmx, vload(s + i));
    mx = vmaxval(vmx);
  }
  for (; i < hi; ++i) mx = s[i] > mx ? s[i] : mx;
  const float m_new = mx > m ? mx : m;
  // (exp(0) = 1 exactly: no libm call while the running max holds, as in most blocks of a decode)
  const float alpha = m == -__builtin_inff() ? 0.0f : m_new == m ? 1.0f : __builtin_expf(m - m_new);
  for (i = 0; i < lo; ++i) s[i] = 0.0f;
  for (i = hi; i < n; ++i) s[i] = 0.0f;
  const V neg_m = vset1(-m_new);
  V sum = vzero();
  for (i = lo; i + kW <= hi; i += kW) {
    const V e = vexp(vadd(vload(s + i), neg_m));
    vstore(s + i, e);
    sum = vadd(sum, e);
  }
  float total = vsum(sum);
  for (; i < hi; ++i) {
    s[i] = __builtin_expf(s[i] - m_new);
    total += s[i];
  }
  l = l * alpha + total;
  m = m_new;
  return alpha;
}

// The fp32 value of each FP8-E4M3 code (dtype.h's to_float), tabulated once: a look-up instead of
// the bit decode where codes are read in bulk (INT4 GEMM group scales, FP8 query rows).
struct Fp8Values {
  float v[256];
  Fp8Values() {
    for (int i = 0; i < 256; ++i) v[i] = to_float(fp8e4m3_t{static_cast<uint8_t>(i)});
  }
};

[[maybe_unused]] const float* fp8_values() {
  static const Fp8Values t;
  return t.v;
}

// row[0, n) *= a (skipped when a == 1).
[[maybe_unused]] void scale_row(float* row, int64_t n, float a) {
  if (a == 1.0f) return;
  const V va = vset1(a);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(row + i, vmul(vload(row + i), va));
  for (; i < n; ++i) row[i] *= a;
}

}  // namespace
}  // namespace fastlayers::cpu::FL_CPU_ISA

// Body of a launcher that runs fn<T>(p) for the three activation dtypes (float, half_t, bf16_t).
#define FL_CPU_BY_FLOAT_DTYPE(fn, p, message)                                \
  switch ((p).dtype) {                                                      \
    case DType::kFloat32:                                                   \
      fn<float>(p);                                                         \
      break;                                                                \
    case DType::kFloat16:                                                   \
      fn<half_t>(p);                                                        \
      break;                                                                \
    case DType::kBFloat16:                                                  \
      fn<bf16_t>(p);                                                        \
      break;                                                                \
    default:                                                                \
      return Status{StatusCode::kInvalidArgument, message};                 \
  }                                                                         \
  return Status{StatusCode::kSuccess, ""};
