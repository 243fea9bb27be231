// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"
#include "rmsnorm/rmsnorm.h"

namespace fastlayers::cpu {
namespace scalar::rmsnorm {
Status forward(const fastlayers::rmsnorm::FwdParams& p);
Status backward(const fastlayers::rmsnorm::BwdParams& p);
}  // namespace scalar::rmsnorm
namespace avx2::rmsnorm {
Status forward(const fastlayers::rmsnorm::FwdParams& p);
Status backward(const fastlayers::rmsnorm::BwdParams& p);
}  // namespace avx2::rmsnorm
namespace avx512::rmsnorm {
Status forward(const fastlayers::rmsnorm::FwdParams& p);
Status backward(const fastlayers::rmsnorm::BwdParams& p);
}  // namespace avx512::rmsnorm
}  // namespace fastlayers::cpu

namespace fastlayers::rmsnorm {
namespace {

bool weight_ok(DType x, DType w) { return w == x || w == DType::kFloat32; }

}  // namespace

Status validate(const FwdParams& p) {
  if (p.rows < 0 || p.cols <= 0) return Status::invalid("rms_norm: need rows >= 0 and cols > 0");
  if (!is_float_activation(p.x_dtype)) return Status::invalid("rms_norm: x must be float32, float16 or bfloat16");
  if (!weight_ok(p.x_dtype, p.weight_dtype)) {
    return Status::invalid("rms_norm: weight must have x's dtype or float32");
  }
  const bool fp8 = p.y_dtype == DType::kFloat8E4M3;
  if (!fp8 && p.y_dtype != p.x_dtype) return Status::invalid("rms_norm: y must have x's dtype or fp8");
  if (fp8 && p.y_scale == nullptr) return Status::invalid("rms_norm: fp8 output needs y_scale");
  if (fp8 && p.weight_offset != 0.0f) {
    return Status::invalid("rms_norm: fp8 output supports weight_offset == 0 only");
  }
  if ((p.residual == nullptr) != (p.residual_out == nullptr)) {
    return Status::invalid("rms_norm: residual and residual_out go together");
  }
  if (p.rows > 0 && (p.x == nullptr || p.weight == nullptr || p.y == nullptr)) {
    return Status::invalid("rms_norm: null x, weight or y");
  }
  if (p.x_row_stride < p.cols && p.rows > 1) return Status::invalid("rms_norm: x rows overlap");
  if (p.residual != nullptr && p.residual_row_stride < p.cols && p.rows > 1) {
    return Status::invalid("rms_norm: residual rows overlap");
  }
  return Status::ok();
}

Status validate(const BwdParams& p) {
  if (p.rows < 0 || p.cols <= 0) return Status::invalid("rms_norm_backward: need rows >= 0 and cols > 0");
  if (!is_float_activation(p.x_dtype)) {
    return Status::invalid("rms_norm_backward: x must be float32, float16 or bfloat16");
  }
  if (!weight_ok(p.x_dtype, p.weight_dtype)) {
    return Status::invalid("rms_norm_backward: weight must have x's dtype or float32");
  }
  if (p.num_partials < 1 || (p.rows > 0 && p.num_partials > p.rows)) {
    return Status::invalid("rms_norm_backward: need 1 <= num_partials <= rows");
  }
  if (p.dw == nullptr || p.dw_partial == nullptr || p.weight == nullptr) {
    return Status::invalid("rms_norm_backward: null weight, dw or dw_partial");
  }
  if (p.rows > 0 && (p.dy == nullptr || p.x == nullptr || p.dx == nullptr)) {
    return Status::invalid("rms_norm_backward: null dy, x or dx");
  }
  if (p.x_row_stride < p.cols && p.rows > 1) return Status::invalid("rms_norm_backward: x rows overlap");
  return Status::ok();
}

Status forward_cpu(const FwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.rows == 0) return Status::ok();
  FL_CPU_DISPATCH(rmsnorm, forward, p)
}

Status backward_cpu(const BwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  // rows == 0 still writes dw (zeros): the kernels handle it with one empty chunk.
  FL_CPU_DISPATCH(rmsnorm, backward, p)
}

}  // namespace fastlayers::rmsnorm
