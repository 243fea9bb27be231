// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"
#include "fff/fff.h"

namespace fastlayers::cpu {
#define FL_DECLARE_FFF(isa)                                        \
  namespace isa::fff {                                             \
  Status ultra_forward(const fastlayers::fff::UltraFwdParams& p);  \
  Status ultra_backward(const fastlayers::fff::UltraBwdParams& p); \
  Status hard_forward(const fastlayers::fff::HardFwdParams& p);    \
  }
FL_DECLARE_FFF(scalar)
FL_DECLARE_FFF(avx2)
FL_DECLARE_FFF(avx512)
#undef FL_DECLARE_FFF
}  // namespace fastlayers::cpu

namespace fastlayers::fff {
Status validate(const UltraFwdParams& p) {
  if (!is_float_activation(p.dtype)) return Status::invalid("ultrafast_ff: dtype must be float32, float16 or bfloat16");
  if (!valid_activation(p.act)) return Status::invalid("ultrafast_ff: unknown activation");
  if (p.tokens < 0 || p.in_features <= 0 || p.out_features <= 0) {
    return Status::invalid("ultrafast_ff: need tokens >= 0 and positive feature sizes");
  }
  if (p.levels < 1 || p.levels > 31) return Status::invalid("ultrafast_ff: need 1 <= depth + 1 <= 31");
  if (p.tokens > 0 && (p.x == nullptr || p.w_in == nullptr || p.w_out == nullptr || p.y == nullptr)) {
    return Status::invalid("ultrafast_ff: null x, w_in, w_out or y");
  }
  if ((p.path == nullptr) != (p.preact == nullptr)) {
    return Status::invalid("ultrafast_ff: path and preact are both given or both null");
  }
  if (p.tokens > 1 && p.x_row_stride < p.in_features) return Status::invalid("ultrafast_ff: x rows overlap");
  return Status::ok();
}

Status validate(const UltraBwdParams& p) {
  if (!is_float_activation(p.dtype)) {
    return Status::invalid("ultrafast_ff_backward: dtype must be float32, float16 or bfloat16");
  }
  if (!valid_activation(p.act)) return Status::invalid("ultrafast_ff_backward: unknown activation");
  if (p.tokens < 0 || p.in_features <= 0 || p.out_features <= 0 || p.levels < 1 || p.levels > 31) {
    return Status::invalid("ultrafast_ff_backward: bad sizes");
  }
  if (p.w_in == nullptr || p.w_out == nullptr || p.dw_in == nullptr || p.dw_out == nullptr ||
      p.offsets == nullptr) {
    return Status::invalid("ultrafast_ff_backward: null weights, weight gradients or offsets");
  }
  if (p.tokens > 0 && (p.dy == nullptr || p.x == nullptr || p.path == nullptr || p.preact == nullptr ||
                       p.order == nullptr || p.dx == nullptr || p.coef == nullptr)) {
    return Status::invalid("ultrafast_ff_backward: null dy, x, path, preact, order, dx or coef");
  }
  if (p.tokens > 1 && p.x_row_stride < p.in_features) {
    return Status::invalid("ultrafast_ff_backward: x rows overlap");
  }
  return Status::ok();
}

Status validate(const HardFwdParams& p) {
  if (!is_float_activation(p.dtype)) return Status::invalid("fff_hard: dtype must be float32, float16 or bfloat16");
  if (!valid_activation(p.act)) return Status::invalid("fff_hard: unknown activation");
  if (p.tokens < 0 || p.in_features <= 0 || p.out_features <= 0 || p.width <= 0) {
    return Status::invalid("fff_hard: need tokens >= 0 and positive feature sizes and leaf width");
  }
  if (p.depth < 0 || p.depth > 30) return Status::invalid("fff_hard: need 0 <= depth <= 30");
  if (p.tokens > 0 && (p.x == nullptr || (p.leaf == nullptr && p.descent_only))) {
    return Status::invalid("fff_hard: null x, or null leaf with descent_only");
  }
  if (p.tokens > 0 && !p.descent_only &&
      (p.w1 == nullptr || p.b1 == nullptr || p.w2 == nullptr || p.b2 == nullptr || p.y == nullptr)) {
    return Status::invalid("fff_hard: null leaf weights or y");
  }
  if (p.tokens > 0 && p.depth > 0 && (p.node_w == nullptr || p.node_b == nullptr)) {
    return Status::invalid("fff_hard: null node weights");
  }
  if (p.tokens > 1 && p.x_row_stride < p.in_features) return Status::invalid("fff_hard: x rows overlap");
  return Status::ok();
}

Status ultra_forward_cpu(const UltraFwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  FL_CPU_DISPATCH(fff, ultra_forward, p)
}

Status ultra_backward_cpu(const UltraBwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  FL_CPU_DISPATCH(fff, ultra_backward, p)  // tokens == 0 still zeroes the weight gradients
}

Status hard_forward_cpu(const HardFwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  FL_CPU_DISPATCH(fff, hard_forward, p)
}

}  // namespace fastlayers::fff
