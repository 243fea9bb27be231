// SPDX-License-Identifier: Apache-2.0
// CPU RMSNorm kernels, compiled once per ISA (cmake/CpuIsa.cmake) into fastlayers::cpu::<isa>.
// One row at a time per thread: a row of up to ~10k fp32 stays in L1/L2 between the passes, so the
// second (and, for FP8, third) pass over it costs no DRAM traffic; rows are split across OpenMP threads.
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include "common/simd_cpu.h"
#include "rmsnorm/rmsnorm.h"

namespace fastlayers::cpu::FL_CPU_ISA::rmsnorm {

using fastlayers::rmsnorm::BwdParams;
using fastlayers::rmsnorm::FwdParams;

namespace {

// Below this many elements the OpenMP fork/join (a few microseconds) costs more than it saves.
constexpr int64_t kParallelMinElements = 1 << 15;

inline float rstd_of(float sum_squares, int64_t cols, float eps) {
  return 1.0f / __builtin_sqrtf(sum_squares / static_cast<float>(cols) + eps);
}

// The next row's inputs (x, and the residual of the fused add), touched a cache line at a time from
// the current row's last pass: that pass is compute-bound and the next row's first pass (the sum of
// squares) would otherwise wait on memory; prefetched, the two overlap (bf16 4096x4096 out=: 3.5-3.9
// -> 2.6-2.9 ms on 2 cores, bench/results/rmsnorm/amd-epyc-out-streaming.md).
struct NextRow {
  const char* a = nullptr;
  const char* b = nullptr;
  // Elements [i, i + step) of the current row are being written; e: element size of the inputs.
  void touch(int64_t i, int64_t e) const {
    if (a == nullptr || ((i * e) & 63) != 0) return;
    __builtin_prefetch(a + i * e);
    if (b != nullptr) __builtin_prefetch(b + i * e);
  }
};

// Sum of x^2 with four independent accumulators (one FMA chain would be latency bound). bf16 loads
// two vectors per unpack pair where the ISA has them (the lane order does not matter to a sum).
template <typename T>
float sum_squares(const T* x, int64_t n) {
  V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    V v0, v1, v2, v3;
#if defined(FL_HAS_BF16_PAIRS)
    if constexpr (IsBf16<T>::value) {
      vload_pair(x + i, v0, v1);
      vload_pair(x + i + 2 * kW, v2, v3);
    } else
#endif
    {
      v0 = vload(x + i), v1 = vload(x + i + kW), v2 = vload(x + i + 2 * kW), v3 = vload(x + i + 3 * kW);
    }
    a0 = vfma(v0, v0, a0);
    a1 = vfma(v1, v1, a1);
    a2 = vfma(v2, v2, a2);
    a3 = vfma(v3, v3, a3);
  }
  for (; i + kW <= n; i += kW) {
    const V v = vload(x + i);
    a0 = vfma(v, v, a0);
  }
  float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
  for (; i < n; ++i) {
    const float f = to_float(x[i]);
    s += f * f;
  }
  return s;
}

#if defined(FL_HAS_BF16_PAIRS)
// The Llama order for a bf16 row whose roundings meet no NaN, on unpack-order pairs: wp is the
// weight with each block of 2*kW permuted to that order (natural order in the tail).
template <bool kStream>
void normalize_llama_bf16_pairs(const bf16_t* s, const float* wp, float r, bf16_t* y, int64_t n,
                                const NextRow& next) {
  const V vr = vset1(r);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    next.touch(i, 2);
    V a, b;
    vload_pair(s + i, a, b);
    a = vmul(vround_nonan(vmul(a, vr), y), vload(wp + i));
    b = vmul(vround_nonan(vmul(b, vr), y), vload(wp + i + kW));
    if constexpr (kStream) {
      vstream_pair_nonan(y + i, a, b);
    } else {
      vstore_pair_nonan(y + i, a, b);
    }
  }
  for (; i + kW <= n; i += kW) vstore(y + i, vmul(vround(vmul(vload(s + i), vr), y), vload(wp + i)));
  for (; i < n; ++i) store_as(y + i, round_to(to_float(s[i]) * r, y) * wp[i]);
}

// The fp32 weight in the pairs' order (owned; the caller frees it).
float* weight_in_pair_order(const float* w, int64_t n) {
  float* wp = new float[n];
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    for (int k = 0; k < kW; ++k) {
      wp[i + k] = w[i + pair_natural_index(k, false)];
      wp[i + kW + k] = w[i + pair_natural_index(k, true)];
    }
  }
  for (; i < n; ++i) wp[i] = w[i];
  return wp;
}
#endif

// out = round(x + res); returns the sum of squares of the rounded sum (what the unfused model sees).
template <typename T>
float add_store_sum_squares(const T* x, const T* res, T* out, int64_t n) {
  V a0 = vzero(), a1 = vzero();
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const V s0 = vround(vadd(vload(x + i), vload(res + i)), out);
    const V s1 = vround(vadd(vload(x + i + kW), vload(res + i + kW)), out);
    vstore(out + i, s0);
    vstore(out + i + kW, s1);
    a0 = vfma(s0, s0, a0);
    a1 = vfma(s1, s1, a1);
  }
  float ss = vsum(vadd(a0, a1));
  for (; i < n; ++i) {
    const float s = round_to(to_float(x[i]) + to_float(res[i]), out);
    store_as(out + i, s);
    ss += s * s;
  }
  return ss;
}

// The rounding and the store of normalize_llama's main loop, by its two switches.
template <bool kNoNaN, typename T>
V round_as(V a, const T* y) {
  if constexpr (kNoNaN) {
    return vround_nonan(a, y);
  } else {
    return vround(a, y);
  }
}
template <bool kNoNaN, bool kStream, typename T>
void put(T* p, V a) {
  if constexpr (kNoNaN && kStream) {
    vstream_nonan(p, a);
  } else if constexpr (kNoNaN) {
    vstore_nonan(p, a);
  } else if constexpr (kStream) {
    vstream(p, a);
  } else {
    vstore(p, a);
  }
}

// Llama / HF order: normalise in fp32, round to the storage dtype, then multiply by the weight.
// kNoNaN: the row's sum of squares and the weight are finite, so neither rounding can meet a NaN and
// the cheaper roundings apply (bf16: a third fewer instructions; the results are identical).
// kStream: non-temporal stores (y and the row length aligned to kStreamAlign).
template <bool kNoNaN, bool kStream, typename T, typename W>
void normalize_llama(const T* s, const W* w, float r, T* y, int64_t n, const NextRow& next) {
  const V vr = vset1(r);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {  // two independent chains: the roundings are long
    next.touch(i, sizeof(T));
    if constexpr (2 * kW * sizeof(T) > 64) next.touch(i + 64 / sizeof(T), sizeof(T));
    const V a = vmul(round_as<kNoNaN>(vmul(vload(s + i), vr), y), vload(w + i));
    const V b = vmul(round_as<kNoNaN>(vmul(vload(s + i + kW), vr), y), vload(w + i + kW));
    put<kNoNaN, kStream>(y + i, a);
    put<kNoNaN, kStream>(y + i + kW, b);
  }
  for (; i + kW <= n; i += kW) vstore(y + i, vmul(vround(vmul(vload(s + i), vr), y), vload(w + i)));
  for (; i < n; ++i) store_as(y + i, round_to(to_float(s[i]) * r, y) * to_float(w[i]));
}

// Gemma order: (s * r) * (offset + w) entirely in fp32, one rounding at the end.
template <bool kStream, typename T, typename W>
void normalize_offset(const T* s, const W* w, float r, float offset, T* y, int64_t n,
                      const NextRow& next) {
  const V vr = vset1(r), voff = vset1(offset);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    next.touch(i, sizeof(T));
    const V v = vmul(vmul(vload(s + i), vr), vadd(voff, vload(w + i)));
    if constexpr (kStream) {
      vstream(y + i, v);
    } else {
      vstore(y + i, v);
    }
  }
  for (; i < n; ++i) store_as(y + i, (to_float(s[i]) * r) * (offset + to_float(w[i])));
}

// max |s r w| over the row, NaN when any product is NaN (a NaN weight, or 0 x inf), as torch's
// amax: the row then gets scale 1, as in the reference (vmax alone would drop the NaN).
template <typename T, typename W>
float amax_normalized(const T* s, const W* w, float r, int64_t n) {
  const V vr = vset1(r);
  V m = vzero();
  bool nan = false;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const V y = vmul(vmul(vload(s + i), vr), vload(w + i));
    nan = nan || vany_nan(y);
    m = vmax(m, vabs(y));
  }
  float amax = vmaxval(m);
  for (; i < n; ++i) {
    const float a = __builtin_fabsf((to_float(s[i]) * r) * to_float(w[i]));
    nan = nan || a != a;
    amax = a > amax ? a : amax;
  }
  return nan ? __builtin_nanf("") : amax;
}

template <typename T, typename W>
void quantize_fp8(const T* s, const W* w, float r, float scale, fp8e4m3_t* y, int64_t n,
                  const NextRow& next) {
  const V vr = vset1(r), vscale = vset1(scale);
  int64_t i = 0;
  // A true division, as the reference divides (a multiply by 1/scale would round differently).
  for (; i + kW <= n; i += kW) {
    next.touch(i, sizeof(T));
    vstore(y + i, vdiv(vmul(vmul(vload(s + i), vr), vload(w + i)), vscale));
  }
  for (; i < n; ++i) y[i] = to_fp8e4m3(((to_float(s[i]) * r) * to_float(w[i])) / scale);
}

// The weight as fp32: converted once per call instead of once per row; `finite` when no element is
// NaN or inf (enables the NaN-free roundings).
struct Fp32Weight {
  const float* data;
  float* owned;
  bool finite;
  template <typename W>
  Fp32Weight(const W* w, int64_t n) : data(nullptr), owned(new float[n]), finite(true) {
    for (int64_t i = 0; i < n; ++i) owned[i] = to_float(w[i]);
    data = owned;
    finite = all_finite(data, n);
  }
  explicit Fp32Weight(const float* w, int64_t n) : data(w), owned(nullptr), finite(all_finite(w, n)) {}
  ~Fp32Weight() { delete[] owned; }
  Fp32Weight(const Fp32Weight&) = delete;
  Fp32Weight& operator=(const Fp32Weight&) = delete;

  static bool all_finite(const float* w, int64_t n) {  // integer form: the compiler vectorises it
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      __builtin_memcpy(&u, w + i, sizeof(u));
      bad |= (u & 0x7F800000u) == 0x7F800000u ? 1u : 0u;
    }
    return bad == 0;
  }
};

// Caller's buffers (out=, in place) at least this large are written with non-temporal stores: they
// cannot stay in the last-level cache for the next op anyway, and skipping the read-for-ownership of
// each destination line cuts the memory traffic of a read-once write-once pass by a third. Not a
// freshly allocated output (FwdParams::fresh_output): the OS zeroes each new page through the cache
// as the first store faults it in, and plain stores then write over lines already there, where
// streaming stores evict them and write the page to memory a second time (Intel Xeon VM, 4096 x
// 4096, interleaved: fp32 10.99 -> 7.69 ms, bf16 6.30 -> 4.31 ms; into a caller's buffer fp32
// streams 3.60 against 4.40 ms plain).
constexpr int64_t kStreamMinBytes = 16 << 20;

template <bool kStream, typename T, typename W>
void forward_row(const FwdParams& p, const Fp32Weight& weight, const float* w_pairs, int64_t row) {
  const int64_t n = p.cols;
  const float* w = weight.data;
  const T* s = static_cast<const T*>(p.x) + row * p.x_row_stride;
  NextRow next;
  if (row + 1 < p.rows) {
    next.a = reinterpret_cast<const char*>(s + p.x_row_stride);
    if (p.residual != nullptr) {
      next.b = reinterpret_cast<const char*>(static_cast<const T*>(p.residual) +
                                             (row + 1) * p.residual_row_stride);
    }
  }
  float ss;
  if (p.residual != nullptr) {
    T* res_out = static_cast<T*>(p.residual_out) + row * n;
    ss = add_store_sum_squares(s, static_cast<const T*>(p.residual) + row * p.residual_row_stride,
                               res_out, n);
    s = res_out;  // normalise the rounded sum, re-read from L1
  } else {
    ss = sum_squares(s, n);
  }
  const float r = rstd_of(ss, n, p.eps);
  if (p.y_dtype == DType::kFloat8E4M3) {
    const float amax = amax_normalized(s, w, r, n);
    const float scale = amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;
    p.y_scale[row] = scale;
    quantize_fp8(s, w, r, scale, static_cast<fp8e4m3_t*>(p.y) + row * n, n, next);
    return;
  }
  T* y = static_cast<T*>(p.y) + row * n;
  if (p.weight_offset != 0.0f || p.round_once) {
    normalize_offset<kStream>(s, w, r, p.weight_offset, y, n, next);
    return;
  }
  const bool row_finite = ss - ss == 0.0f;
#if defined(FL_HAS_BF16_PAIRS)
  if constexpr (IsBf16<T>::value) {
    if (w_pairs != nullptr && row_finite) {
      normalize_llama_bf16_pairs<kStream>(s, w_pairs, r, y, n, next);
      return;
    }
  }
#endif
  (void)w_pairs;
  if (weight.finite && row_finite) {
    normalize_llama<true, kStream>(s, w, r, y, n, next);
  } else {
    normalize_llama<false, kStream>(s, w, r, y, n, next);
  }
}

template <bool kStream, typename T, typename W>
void forward_all_rows(const FwdParams& p, const Fp32Weight& weight, const float* w_pairs) {
#pragma omp parallel if (p.rows > 1 && p.rows * p.cols >= kParallelMinElements)
  {
#pragma omp for schedule(static) nowait
    for (int64_t row = 0; row < p.rows; ++row) forward_row<kStream, T, W>(p, weight, w_pairs, row);
    if constexpr (kStream) stream_fence();  // this thread's streamed rows, before the join
  }
}

template <typename T, typename W>
void forward_rows(const FwdParams& p) {
  const int64_t n = p.cols;
  const Fp32Weight weight(static_cast<const W*>(p.weight), n);
  const bool fp8 = p.y_dtype == DType::kFloat8E4M3;
  float* w_pairs = nullptr;  // bf16 Llama form without NaN: the weight in the pairs' order
#if defined(FL_HAS_BF16_PAIRS)
  if constexpr (IsBf16<T>::value) {
    if (!fp8 && p.weight_offset == 0.0f && !p.round_once && weight.finite) {
      w_pairs = weight_in_pair_order(weight.data, n);
    }
  }
#endif
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(T));
  const bool stream = kStreamAlign > 1 && !fp8 && !p.fresh_output && p.rows * row_bytes >= kStreamMinBytes &&
                      reinterpret_cast<uintptr_t>(p.y) % kStreamAlign == 0 &&
                      row_bytes % kStreamAlign == 0;
  if (stream) {
    forward_all_rows<true, T, W>(p, weight, w_pairs);
  } else {
    forward_all_rows<false, T, W>(p, weight, w_pairs);
  }
  delete[] w_pairs;
}

template <typename T, typename W>
void backward_rows(const BwdParams& p) {
  const int64_t n = p.cols, chunks = p.num_partials;
  const Fp32Weight weight(static_cast<const W*>(p.weight), n);
  const float* w = weight.data;
  const bool llama = p.weight_offset == 0.0f && !p.round_once;
  const V voff = vset1(p.weight_offset);
  const bool parallel = p.rows * n >= kParallelMinElements;
  // Fixed row chunks (not per-thread) so dw does not depend on the number of threads.
#pragma omp parallel for schedule(static) if (parallel && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    float* part = p.dw_partial + c * n;
    for (int64_t j = 0; j < n; ++j) part[j] = 0.0f;
    const int64_t row_begin = c * p.rows / chunks, row_end = (c + 1) * p.rows / chunks;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T* s = static_cast<const T*>(p.x) + row * p.x_row_stride;
      const T* dy = static_cast<const T*>(p.dy) + row * n;
      T* dx = static_cast<T*>(p.dx) + row * n;
      V ss0 = vzero(), dot0 = vzero();
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const V vs = vload(s + i);
        ss0 = vfma(vs, vs, ss0);
        dot0 = vfma(vmul(vload(dy + i), vadd(voff, vload(w + i))), vs, dot0);
      }
      float ss = vsum(ss0), dot = vsum(dot0);
      for (; i < n; ++i) {
        const float sv = to_float(s[i]);
        ss += sv * sv;
        dot += to_float(dy[i]) * (p.weight_offset + to_float(w[i])) * sv;
      }
      const float r = rstd_of(ss, n, p.eps);
      const float coef = r * r * r * dot / static_cast<float>(n);
      const V vr = vset1(r), vneg_coef = vset1(-coef);
      const T* dres = static_cast<const T*>(p.d_residual_out);
      NextRow next;
      if (row + 1 < row_end) {
        next.a = reinterpret_cast<const char*>(s + p.x_row_stride);
        next.b = reinterpret_cast<const char*>(dy + n);
      }
      i = 0;
      for (; i + kW <= n; i += kW) {
        next.touch(i, sizeof(T));
        if constexpr (kW * sizeof(T) > 64) next.touch(i + 64 / sizeof(T), sizeof(T));
        const V vs = vload(s + i), vdy = vload(dy + i);
        V d = vadd(vmul(vr, vmul(vdy, vadd(voff, vload(w + i)))), vmul(vneg_coef, vs));
        if (dres != nullptr) d = vadd(d, vload(dres + row * n + i));
        vstore(dx + i, d);
        const V nrm = llama ? vround(vmul(vs, vr), s) : vmul(vs, vr);
        vstore(part + i, vfma(vdy, nrm, vload(part + i)));
      }
      for (; i < n; ++i) {
        const float sv = to_float(s[i]), dyv = to_float(dy[i]);
        float d = r * (dyv * (p.weight_offset + to_float(w[i]))) + (-coef) * sv;
        if (dres != nullptr) d += to_float(dres[row * n + i]);
        store_as(dx + i, d);
        const float nrm = llama ? round_to(sv * r, s) : sv * r;
        part[i] += dyv * nrm;
      }
    }
  }
  // dw = partials summed in chunk order.
  W* dw = static_cast<W*>(p.dw);
  constexpr int64_t kBlock = 64 * kW;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (parallel && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = (b + 1) * kBlock < n ? (b + 1) * kBlock : n;
    int64_t j = b * kBlock;
    for (; j + kW <= end; j += kW) {
      V acc = vzero();
      for (int64_t c = 0; c < chunks; ++c) acc = vadd(acc, vload(p.dw_partial + c * n + j));
      vstore(dw + j, acc);
    }
    for (; j < end; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) acc += p.dw_partial[c * n + j];
      store_as(dw + j, acc);
    }
  }
}

template <template <typename, typename> class Op, typename P>
Status dispatch(const P& p) {
  const bool w32 = p.weight_dtype == DType::kFloat32;
  switch (p.x_dtype) {
    case DType::kFloat32:
      Op<float, float>::run(p);
      break;
    case DType::kFloat16:
      w32 ? Op<half_t, float>::run(p) : Op<half_t, half_t>::run(p);
      break;
    case DType::kBFloat16:
      w32 ? Op<bf16_t, float>::run(p) : Op<bf16_t, bf16_t>::run(p);
      break;
    default:
      return Status{StatusCode::kInvalidArgument, "rms_norm: x must be float32, float16 or bfloat16"};
  }
  return Status{StatusCode::kSuccess, ""};
}

template <typename T, typename W>
struct Forward {
  static void run(const FwdParams& p) { forward_rows<T, W>(p); }
};
template <typename T, typename W>
struct Backward {
  static void run(const BwdParams& p) { backward_rows<T, W>(p); }
};

}  // namespace

Status forward(const FwdParams& p) { return dispatch<Forward>(p); }
Status backward(const BwdParams& p) { return dispatch<Backward>(p); }

}  // namespace fastlayers::cpu::FL_CPU_ISA::rmsnorm
