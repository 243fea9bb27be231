// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"
#include "skip/skip.h"

namespace fastlayers::cpu {
#define FL_DECLARE_SKIP(isa)                                           \
  namespace isa::skip {                                                \
  Status varlen_attention(const fastlayers::skip::VarlenParams& p);    \
  Status varlen_attention_backward(const fastlayers::skip::VarlenBwdParams& p); \
  }
FL_DECLARE_SKIP(scalar)
FL_DECLARE_SKIP(avx2)
FL_DECLARE_SKIP(avx512)
#undef FL_DECLARE_SKIP
}  // namespace fastlayers::cpu

namespace fastlayers::skip {

// The inputs (sizes, q / k / v, sequences, positions) that forward and backward share.
static Status validate_inputs(const VarlenParams& p) {
  if (!is_float_activation(p.dtype)) {
    return Status::invalid("varlen_attention: dtype must be float32, float16 or bfloat16");
  }
  if (p.nq < 0 || p.nk < 0 || p.batch < 0 || p.hq <= 0 || p.hkv <= 0 || p.hq % p.hkv || p.d <= 0 || p.dv <= 0) {
    return Status::invalid("varlen_attention: bad sizes (need hq a multiple of hkv, d and dv > 0)");
  }
  if (p.window_left < -1 || p.window_right < -1) return Status::invalid("varlen_attention: bad window");
  if (p.nq > 0 && (p.q == nullptr || p.q_pos == nullptr || p.cu_seqlens_q == nullptr ||
                   p.cu_seqlens_k == nullptr)) {
    return Status::invalid("varlen_attention: null pointer argument");
  }
  if (p.nk > 0 && (p.k == nullptr || p.v == nullptr || p.k_pos == nullptr)) {
    return Status::invalid("varlen_attention: null pointer argument");
  }
  return Status::ok();
}

Status validate(const VarlenParams& p) {
  if (Status s = validate_inputs(p); !s.is_ok()) return s;
  if (p.nq > 0 && (p.out == nullptr || p.lse == nullptr)) {
    return Status::invalid("varlen_attention: null output pointer");
  }
  return Status::ok();
}

Status varlen_attention_cpu(const VarlenParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.nq == 0) return Status::ok();
  if (p.nk > 0 && p.k_t == nullptr) return Status::invalid("varlen_attention: null workspace");
  FL_CPU_DISPATCH(skip, varlen_attention, p)
}

Status varlen_attention_backward_cpu(const VarlenBwdParams& p) {
  if (Status s = validate_inputs(p.fwd); !s.is_ok()) return s;
  if (p.fwd.nq == 0) return Status::ok();
  if (p.out == nullptr || p.dout == nullptr || p.lse == nullptr || p.dq == nullptr ||
      (p.fwd.nk > 0 && (p.dk == nullptr || p.dv == nullptr))) {
    return Status::invalid("varlen_attention_backward: null pointer argument");
  }
  FL_CPU_DISPATCH(skip, varlen_attention_backward, p)
}

}  // namespace fastlayers::skip
