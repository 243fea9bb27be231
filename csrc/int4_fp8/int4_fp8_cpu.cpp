// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"
#include "int4_fp8/int4_fp8.h"

namespace fastlayers::cpu {
#define FL_DECLARE_INT4_FP8(isa)                                        \
  namespace isa::int4_fp8 {                                             \
  Status gemm(const fastlayers::int4_fp8::GemmParams& p);               \
  Status quantize(const fastlayers::int4_fp8::QuantizeParams& p);       \
  }
FL_DECLARE_INT4_FP8(scalar)
FL_DECLARE_INT4_FP8(avx2)
FL_DECLARE_INT4_FP8(avx512)
#undef FL_DECLARE_INT4_FP8
}  // namespace fastlayers::cpu

namespace fastlayers::int4_fp8 {

static bool is_out_dtype(DType t) { return is_float_activation(t); }

Status validate(const GemmParams& p) {
  if (p.m < 0 || p.n <= 0 || p.k <= 0 || p.k % 2) {
    return Status::invalid("int4_fp8_gemm: need m >= 0, n > 0 and an even k > 0");
  }
  if (p.group_size <= 0 || p.group_size % 2) return Status::invalid("int4_fp8_gemm: group_size must be positive and even");
  if (!is_out_dtype(p.out_dtype)) return Status::invalid("int4_fp8_gemm: out_dtype must be float32, float16 or bfloat16");
  if (p.bias != nullptr && !is_float_activation(p.bias_dtype)) {
    return Status::invalid("int4_fp8_gemm: bias must be float32, float16 or bfloat16");
  }
  if (p.m > 0 && (p.xq == nullptr || p.xs == nullptr || p.qweight == nullptr || p.group_scale == nullptr ||
                  p.channel_scale == nullptr || p.y == nullptr)) {
    return Status::invalid("int4_fp8_gemm: null pointer argument");
  }
  if (p.m > 1 && p.x_row_stride < p.k) return Status::invalid("int4_fp8_gemm: xq rows overlap");
  return Status::ok();
}

Status validate(const QuantizeParams& p) {
  if (!is_float_activation(p.dtype)) {
    return Status::invalid("quantize_fp8_per_token: dtype must be float32, float16 or bfloat16");
  }
  if (p.rows < 0 || p.cols <= 0) return Status::invalid("quantize_fp8_per_token: need rows >= 0 and cols > 0");
  if (p.rows > 0 && (p.x == nullptr || p.xq == nullptr || p.xs == nullptr)) {
    return Status::invalid("quantize_fp8_per_token: null pointer argument");
  }
  if (p.rows > 1 && p.x_row_stride < p.cols) return Status::invalid("quantize_fp8_per_token: x rows overlap");
  return Status::ok();
}

Status gemm_cpu(const GemmParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.m == 0) return Status::ok();
  FL_CPU_DISPATCH(int4_fp8, gemm, p)
}

Status quantize_cpu(const QuantizeParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.rows == 0) return Status::ok();
  FL_CPU_DISPATCH(int4_fp8, quantize, p)
}

}  // namespace fastlayers::int4_fp8
