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
  // CPU workspace of varlen_cpu_workspace_floats(): the keys transposed to fp32 [hkv, d, nk] (or
  // bf16 pairs [hkv, d / 2, nk]), then the values per kv head in fp32 [hkv, nk, dv] (contiguous
  // rows: in place, a value row is hkv * dv apart, 4 KiB at 16 heads of 64, and the rows a tile
  // reads crowd the same L1 sets).
  float* k_t = nullptr;
  int64_t nq = 0, nk = 0, batch = 0, hq = 0, hkv = 0, d = 0, dv = 0;
  int64_t window_left = -1, window_right = -1;
  float scale = 1.0f;
  // Logit soft-capping (Gemma 2), when > 0: each scaled score s becomes softcap * tanh(s / softcap)
  // before the softmax (the backward multiplies ds by 1 - tanh^2). 0: none.
  float softcap = 0.0f;
  DType dtype = DType::kFloat32;
};

// The CPU forward's workspace, in floats.
inline int64_t varlen_cpu_workspace_floats(int64_t nk, int64_t hkv, int64_t d, int64_t dv) {
  return hkv * nk * (d + dv);
}

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
  float* delta = nullptr;             // CUDA workspace [nq, hq]: D = dO . O
};

// Routed rows in and out of the residual stream (idx: negative entries are routing padding).
// gather:  y[m] = x[idx[m]], or a zero row for idx[m] < 0.
// scatter: y = residual; y[idx[m]] = T(float(double(residual[idx[m]]) + double(out[m]) * gate[m]))
//          for idx[m] >= 0 (indices unique; the product is exact in double, so the result does not
//          depend on FMA contraction); gate null means 1.
// scatter backward (d_residual is dy itself): d_out[m] = T(float(double(dy[idx[m]]) * gate[m])),
//          d_gate[m] = sum_j dy[idx[m], j] out[m, j] (double accumulation), zeros for padding.
struct RowsParams {
  const void* x = nullptr;          // gather: x [n, dim]; scatter: residual [n, dim]; bwd: dy [n, dim]
  const int64_t* idx = nullptr;     // [m]
  const void* rows = nullptr;       // scatter (and bwd): out [m, dim]
  const float* gate = nullptr;      // [m] fp32 or null
  void* y = nullptr;                // gather: [m, dim]; scatter: [n, dim]; bwd: d_out [m, dim]
  float* d_gate = nullptr;          // bwd: [m] or null
  int64_t n = 0, m = 0, dim = 0;
  DType dtype = DType::kFloat32;
};

Status gather_rows_cpu(const RowsParams& p);
Status scatter_add_gated_cpu(const RowsParams& p);
Status scatter_add_gated_backward_cpu(const RowsParams& p);
Status gather_rows_cuda(const RowsParams& p, void* stream);
Status scatter_add_gated_cuda(const RowsParams& p, void* stream);
Status scatter_add_gated_backward_cuda(const RowsParams& p, void* stream);

// CUDA (varlen_cuda.cu): head dims up to 256; forward and backward run on tensor cores for
// fp16/bf16 with d == dv in {64, 128} (the backward as FlashAttention-2's: a CTA per 64 keys of a kv
// head for dK/dV, one per 64 query rows of a head for dQ), the forward also at 256 where a block can
// have its ~100 KiB of shared memory (sm80, sm90); on CUDA cores otherwise (backward: a warp per
// (key, kv head) for dK/dV, a warp per (query, head) for dQ). No atomics: deterministic.
bool varlen_attention_cuda_supported(int64_t d, int64_t dv, int64_t nq, int64_t hq);
Status varlen_attention_cuda(const VarlenParams& p, void* stream);
Status varlen_attention_backward_cuda(const VarlenBwdParams& p, void* stream);

Status validate(const VarlenParams& p);
// The backward's arguments: the forward's inputs, out, lse and the gradients (not the forward's own
// output pointers, which a backward call leaves unset). Shared by the CPU and CUDA launchers.
Status validate_backward(const VarlenBwdParams& p);
Status varlen_attention_cpu(const VarlenParams& p);
Status varlen_attention_backward_cpu(const VarlenBwdParams& p);

}  // namespace fastlayers::skip
