// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"
#include "peer/peer.h"

namespace fastlayers::cpu {
#define FL_DECLARE_PEER(isa)                                                  \
  namespace isa::peer {                                                       \
  Status experts_forward(const fastlayers::peer::ExpertsFwdParams& p);        \
  Status experts_backward(const fastlayers::peer::ExpertsBwdParams& p);       \
  Status retrieve(const fastlayers::peer::RetrieveParams& p);                 \
  }
FL_DECLARE_PEER(scalar)
FL_DECLARE_PEER(avx2)
FL_DECLARE_PEER(avx512)
#undef FL_DECLARE_PEER
}  // namespace fastlayers::cpu

namespace fastlayers::peer {
Status validate(const RetrieveParams& p) {
  if (!is_float_activation(p.dtype)) return Status::invalid("peer_retrieve: dtype must be float32, float16 or bfloat16");
  if (p.tokens < 0 || p.heads <= 0 || p.dim_key <= 0 || p.dim_key % 2 || p.num_keys <= 0) {
    return Status::invalid("peer_retrieve: need tokens >= 0, heads > 0, num_keys > 0 and an even dim_key > 0");
  }
  if (p.topk <= 0 || p.topk > p.num_keys * p.num_keys) {
    return Status::invalid("peer_retrieve: need 0 < topk <= num_keys^2");
  }
  if (p.keys_padded < p.num_keys || p.keys_padded % kRetrieveKeyTile) {
    return Status::invalid("peer_retrieve: keys_padded must be >= num_keys and a multiple of 32");
  }
  if (p.tokens > 0 && (p.queries == nullptr || p.keys_t == nullptr || p.indices == nullptr || p.gates == nullptr)) {
    return Status::invalid("peer_retrieve: null pointer argument");
  }
  return Status::ok();
}

Status validate(const ExpertsFwdParams& p) {
  if (!is_float_activation(p.dtype)) return Status::invalid("peer_experts: dtype must be float32, float16 or bfloat16");
  if (!valid_activation(p.act)) return Status::invalid("peer_experts: unknown activation");
  if (p.tokens < 0 || p.dim <= 0 || p.pairs <= 0 || p.num_experts <= 0) {
    return Status::invalid("peer_experts: need tokens >= 0 and positive dim, pairs, num_experts");
  }
  if (p.tokens > 0 && (p.x == nullptr || p.indices == nullptr || p.gates == nullptr ||
                       p.down == nullptr || p.up == nullptr || p.y == nullptr || p.preact == nullptr)) {
    return Status::invalid("peer_experts: null pointer argument");
  }
  if (p.tokens > 1 && p.x_row_stride < p.dim) return Status::invalid("peer_experts: x rows overlap");
  return Status::ok();
}

Status validate(const ExpertsBwdParams& p) {
  if (!is_float_activation(p.dtype)) {
    return Status::invalid("peer_experts_backward: dtype must be float32, float16 or bfloat16");
  }
  if (!valid_activation(p.act)) return Status::invalid("peer_experts_backward: unknown activation");
  if (p.tokens < 0 || p.dim <= 0 || p.pairs <= 0 || p.num_experts <= 0 || p.unique < 0 ||
      p.unique > p.tokens * p.pairs) {
    return Status::invalid("peer_experts_backward: bad sizes");
  }
  if (p.seg_offsets == nullptr) return Status::invalid("peer_experts_backward: null seg_offsets");
  if (p.tokens > 0 &&
      (p.dy == nullptr || p.x == nullptr || p.indices == nullptr || p.gates == nullptr ||
       p.down == nullptr || p.up == nullptr || p.preact == nullptr || p.order == nullptr ||
       p.dx == nullptr || p.dgates == nullptr || p.coef == nullptr)) {
    return Status::invalid("peer_experts_backward: null pointer argument");
  }
  if ((p.unique > 0 || p.dense) && (p.ddown_rows == nullptr || p.dup_rows == nullptr)) {
    return Status::invalid("peer_experts_backward: null gradient rows");
  }
  if (p.dense && p.unique > 0 && p.ids == nullptr) {
    return Status::invalid("peer_experts_backward: dense gradients need the selected expert ids");
  }
  if (p.tokens > 1 && p.x_row_stride < p.dim) return Status::invalid("peer_experts_backward: x rows overlap");
  return Status::ok();
}

Status retrieve_cpu(const RetrieveParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  FL_CPU_DISPATCH(peer, retrieve, p)
}

Status experts_forward_cpu(const ExpertsFwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  FL_CPU_DISPATCH(peer, experts_forward, p)
}

Status experts_backward_cpu(const ExpertsBwdParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.tokens == 0) return Status::ok();
  FL_CPU_DISPATCH(peer, experts_backward, p)
}

}  // namespace fastlayers::peer
