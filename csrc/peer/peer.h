// SPDX-License-Identifier: Apache-2.0
// PEER expert launchers: single-neuron experts gathered by index, gated, summed. Semantics:
// python/fastlayers/reference/peer.py. Per token t and pair p (heads x top-k flattened), e = idx[t, p]:
//   s = down[e] . x_t        y_t = sum_p gate[t, p] * act(s) * up[e]
// Backward, c = dy_t . up[e]:  dgate = act(s) c;  coef = act'(s) gate c;  dx_t = sum_p coef down[e];
//   per selected expert (a segment of the expert-sorted pair list, in token order: deterministic):
//   ddown[e] = sum coef x_t,  dup[e] = sum act(s) gate dy_t, written as compact rows [unique, dim],
//   or (dense) straight into full [num_experts, dim] tables whose other rows are zeroed in the same
//   pass: every table row is written exactly once, in ascending order per thread.
// Nothing of size [tokens, pairs, dim] is materialised.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"
#include "fff/fff.h"

namespace fastlayers::peer {

using fff::Activation;

struct ExpertsFwdParams {
  const void* x = nullptr;          // [tokens, dim], row stride x_row_stride
  int64_t x_row_stride = 0;
  const int64_t* indices = nullptr; // [tokens, pairs], each in [0, num_experts)
  const void* gates = nullptr;      // [tokens, pairs], dtype
  const void* down = nullptr;       // [num_experts, dim] contiguous
  const void* up = nullptr;         // [num_experts, dim] contiguous
  void* y = nullptr;                // [tokens, dim] contiguous
  float* preact = nullptr;          // [tokens, pairs]
  int64_t tokens = 0, dim = 0, pairs = 0, num_experts = 0;
  DType dtype = DType::kFloat32;    // x, gates, tables, y
  Activation act = Activation::kGelu;
};

struct ExpertsBwdParams {
  const void* dy = nullptr;         // [tokens, dim] contiguous
  const void* x = nullptr;          // [tokens, dim], row stride x_row_stride
  int64_t x_row_stride = 0;
  const int64_t* indices = nullptr; // [tokens, pairs]
  const void* gates = nullptr;      // [tokens, pairs]
  const void* down = nullptr;       // [num_experts, dim]
  const void* up = nullptr;         // [num_experts, dim]
  const float* preact = nullptr;    // [tokens, pairs] from the forward
  const int32_t* order = nullptr;   // [tokens * pairs] pair ids sorted by expert, token order kept
  const int64_t* seg_offsets = nullptr; // [unique + 1]: segment u is order[seg_offsets[u], ...[u+1])
  int64_t unique = 0;               // number of distinct selected experts
  const int64_t* ids = nullptr;     // [unique] the selected experts, ascending (needed when dense)
  bool dense = false;               // gradient tables [num_experts, dim] instead of compact rows
  void* dx = nullptr;               // [tokens, dim]
  void* dgates = nullptr;           // [tokens, pairs]
  void* ddown_rows = nullptr;       // [unique, dim]: gradient rows of the selected experts, in
  void* dup_rows = nullptr;         // [unique, dim]  segment order ([num_experts, dim] when dense)
  float* coef = nullptr;            // workspace [tokens, pairs]
  int64_t tokens = 0, dim = 0, pairs = 0, num_experts = 0;
  DType dtype = DType::kFloat32;
  Activation act = Activation::kGelu;
};

// Product-key retrieval, per token t and head h (semantics: reference.peer.peer_retrieve): the query
// halves q1, q2 [dim_key/2] are scored against their sub-keys, the top-kh (kh = min(topk, K)) of
// each half are merged into the top-k of the kh x kh sums (expert i * K + j), and the gates are a
// softmax over the k scores (or ReLU of each). One pass per (token block, head): the sub-key scores
// live in a [block, 2, K] tile, never in a [tokens, heads, K] table. Ties: lower candidate first.
struct RetrieveParams {
  const void* queries = nullptr;   // [tokens, heads, dim_key] contiguous, dtype
  const float* keys_t = nullptr;   // [heads, 2, keys_padded / 32, dim_key/2, 32] fp32: sub-keys in
                                   // transposed panels of 32; keys >= num_keys ignored
  int64_t* indices = nullptr;      // [tokens, heads, topk]: i * num_keys + j
  void* gates = nullptr;           // [tokens, heads, topk], dtype
  int64_t tokens = 0, heads = 0, dim_key = 0, num_keys = 0, keys_padded = 0, topk = 0;
  bool relu_gates = false;         // ReLU of each score instead of the softmax over them
  DType dtype = DType::kFloat32;
};

// keys_padded must be a multiple of this (the kernels score kRetrieveKeyTile keys at a time).
constexpr int64_t kRetrieveKeyTile = 32;

Status validate(const RetrieveParams& p);
Status retrieve_cpu(const RetrieveParams& p);
Status validate(const ExpertsFwdParams& p);
Status validate(const ExpertsBwdParams& p);
Status experts_forward_cpu(const ExpertsFwdParams& p);
Status experts_backward_cpu(const ExpertsBwdParams& p);

// CUDA (peer_cuda.cu): one CTA per token keeps the token's row and its pairs in shared memory.
constexpr int64_t kExpertsCudaSmemBytes = 48 * 1024;
bool experts_cuda_supported(int64_t tokens, int64_t dim, int64_t pairs);
// CUDA retrieval (peer_retrieve_cuda.cu): one CTA per (block of tokens, head), score tile in shared
// memory; supported when one token's tile, lists and query fit in 48 KiB.
bool retrieve_cuda_supported(int64_t tokens, int64_t heads, int64_t dim_key, int64_t num_keys,
                             int64_t keys_padded, int64_t topk);
Status retrieve_cuda(const RetrieveParams& p, void* stream);
Status experts_forward_cuda(const ExpertsFwdParams& p, void* stream);
Status experts_backward_cuda(const ExpertsBwdParams& p, void* stream);

}  // namespace fastlayers::peer
