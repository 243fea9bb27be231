// SPDX-License-Identifier: Apache-2.0
// Fast feedforward (FFF) tree routing launchers: raw pointers, sizes, strides (in elements), a stream.
//
// Heap-ordered trees: node n has children 2n+1 (left) and 2n+2 (right); a token goes right iff the
// node's logit is > 0 (exactly 0 goes left) in every backend. Semantics: python/fastlayers/reference/fff.py.
//
// UltraFastBERT form, levels = depth + 1, nodes = 2^levels - 1:
//   node = 0; for l < levels: a_l = w_in[node].x (+ b_in[node]); y += act(a_l) w_out[node];
//                             node = 2 node + 1 + (a_l > 0)
//   The path depends on x and w_in only, so the kernels descend first (dots) and then form each output
//   element as a sum over the levels in registers: no accumulator row, one rounding per output.
// Backward (same hard path): c_l = act'(a_l) (dy . w_out[n_l]);  dx = sum_l c_l w_in[n_l];
//   dw_in[n] = sum c x, db_in[n] = sum c, dw_out[n] = sum act(a) dy over the (token, level) pairs that
//   visited n, summed in token order from a node-sorted pair list: deterministic.
//
// Classic FFF (hard descent, inference): depth levels of node neurons (node_w, node_b), then leaf j:
//   y = act(x w1[j] + b1[j]) w2[j] + b2[j],  w1 [leaves, in, width], w2 [leaves, width, out].
//
// The Python layer (python/fastlayers/ops/fff.py) validates, allocates every output and workspace.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace fastlayers::fff {

enum class Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

static inline bool valid_activation(Activation a) {
  return a == Activation::kGelu || a == Activation::kGeluTanh || a == Activation::kRelu ||
         a == Activation::kSilu;
}

struct UltraFwdParams {
  const void* x = nullptr;       // [tokens, in], row stride x_row_stride, unit column stride
  int64_t x_row_stride = 0;
  const void* w_in = nullptr;    // [nodes, in] contiguous
  const void* b_in = nullptr;    // optional [nodes]
  const void* w_out = nullptr;   // [nodes, out] contiguous
  void* y = nullptr;             // [tokens, out] contiguous
  int32_t* path = nullptr;       // [tokens, levels]: node visited at each level
  float* preact = nullptr;       // [tokens, levels]: a_l (path and preact: both null for
                                 // inference, which needs neither)
  int64_t tokens = 0, in_features = 0, out_features = 0, levels = 0;
  DType dtype = DType::kFloat32; // x, weights and y share it
  Activation act = Activation::kGelu;
};

struct UltraBwdParams {
  const void* dy = nullptr;      // [tokens, out] contiguous
  const void* x = nullptr;       // [tokens, in], row stride x_row_stride
  int64_t x_row_stride = 0;
  const void* w_in = nullptr;    // [nodes, in]
  const void* w_out = nullptr;   // [nodes, out]
  const int32_t* path = nullptr; // [tokens, levels] from the forward
  const float* preact = nullptr; // [tokens, levels] from the forward
  const int32_t* order = nullptr;   // [tokens * levels]: pair ids (t * levels + l) sorted by node,
                                    // token order within a node (a stable sort of path)
  const int64_t* offsets = nullptr; // [nodes + 1]: node n's pairs are order[offsets[n], offsets[n+1])
  void* dx = nullptr;            // [tokens, in] contiguous
  void* dw_in = nullptr;         // [nodes, in]
  void* db_in = nullptr;         // optional [nodes]
  void* dw_out = nullptr;        // [nodes, out]
  float* coef = nullptr;         // workspace [tokens, levels]
  int64_t tokens = 0, in_features = 0, out_features = 0, levels = 0;
  DType dtype = DType::kFloat32;
  Activation act = Activation::kGelu;
};

struct HardFwdParams {
  const void* x = nullptr;       // [tokens, in], row stride x_row_stride
  int64_t x_row_stride = 0;
  const void* node_w = nullptr;  // [2^depth - 1, in]
  const void* node_b = nullptr;  // [2^depth - 1]
  const void* w1 = nullptr;      // [2^depth, in, width]
  const void* b1 = nullptr;      // [2^depth, width]
  const void* w2 = nullptr;      // [2^depth, width, out]
  const void* b2 = nullptr;      // [2^depth, out]
  void* y = nullptr;             // [tokens, out] contiguous; unused with descent_only
  int32_t* leaf = nullptr;       // [tokens]; may be null (not written) unless descent_only
  bool descent_only = false;     // only route (write leaf): the caller runs per-leaf GEMMs
  int64_t tokens = 0, in_features = 0, out_features = 0, width = 0, depth = 0;
  DType dtype = DType::kFloat32;
  Activation act = Activation::kGelu;
};

Status validate(const UltraFwdParams& p);
Status validate(const UltraBwdParams& p);
Status validate(const HardFwdParams& p);

Status ultra_forward_cpu(const UltraFwdParams& p);
Status ultra_backward_cpu(const UltraBwdParams& p);
Status hard_forward_cpu(const HardFwdParams& p);

// `stream` is a cudaStream_t.
Status ultra_forward_cuda(const UltraFwdParams& p, void* stream);
Status ultra_backward_cuda(const UltraBwdParams& p, void* stream);
Status hard_forward_cuda(const HardFwdParams& p, void* stream);

}  // namespace fastlayers::fff
