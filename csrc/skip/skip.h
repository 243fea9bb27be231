// SPDX-License-Identifier: Apache-2.0
// Sparse layer-skip attention launchers. Semantics: python/fastlayers/reference/skip.py.
// Packed variable-length attention whose mask comes from original token positions: query i of
// sequence b sees key j of b iff q_pos[i] - left <= k_pos[j] <= q_pos[i] + right (left/right -1:
// unbounded; causal sets right = 0). Positions strictly increase within each sequence (the Python
// layer checks), so each query's visible keys are one contiguous range found by binary search and
// key tiles outside every query's range are never touched. fp32 scores, online softmax, fp32
// accumulation; a query with no visible key gets zeros and lse = -inf. GQA: query head h reads
// key/value head h / (hq / hkv).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace fastlayers::skip {

struct VarlenParams {
  const void* q = nullptr;            // [nq, hq, d] contiguous, dtype
  const void* k = nullptr;            // [nk, hkv, d] contiguous
  const void* v = nullptr;            // [nk, hkv, dv] contiguous
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1], cu[0] = 0
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1]
  const int64_t* q_pos = nullptr;     // [nq]
  const int64_t* k_pos = nullptr;     // [nk]
  void* out = nullptr;                // [nq, hq, dv] contiguous, dtype
  float* lse = nullptr;               // [nq, hq]
  float* k_t = nullptr;               // CPU workspace [hkv, d, nk]: keys transposed to fp32
  int64_t nq = 0, nk = 0, batch = 0, hq = 0, hkv = 0, d = 0, dv = 0;
  int64_t window_left = -1, window_right = -1;
  float scale = 1.0f;
  DType dtype = DType::kFloat32;
};

// Backward, recomputing the probabilities from the saved lse (FlashAttention-2 style): per query
// row D = dO . O, and for each visible key p = exp(s - lse), dV += p dO, ds = p (dO . v - D + dlse),
// dQ += scale ds k, dK += scale ds q. One task per (sequence, kv head) owns its keys' dK / dV rows
// and its query rows' dQ: deterministic, no atomics.
struct VarlenBwdParams {
  VarlenParams fwd;                   // q, k, v, cu_seqlens, positions, sizes, window, scale, dtype
  const void* out = nullptr;          // [nq, hq, dv] the forward's output
  const void* dout = nullptr;         // [nq, hq, dv]
  const float* lse = nullptr;         // [nq, hq] the forward's
  const float* dlse = nullptr;        // [nq, hq] or null
  void* dq = nullptr;                 // [nq, hq, d]  rows outside every sequence: left as they are
  void* dk = nullptr;                 // [nk, hkv, d]
  void* dv = nullptr;                 // [nk, hkv, dv]
};

Status validate(const VarlenParams& p);
Status varlen_attention_cpu(const VarlenParams& p);
Status varlen_attention_backward_cpu(const VarlenBwdParams& p);

}  // namespace fastlayers::skip
