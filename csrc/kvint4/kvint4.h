// SPDX-License-Identifier: Apache-2.0
// Decode attention over an INT4 KV cache (FireQ format). Semantics:
// python/fastlayers/quant/rope_kv.py (quantize_kv_int4) and the reference in ops/kvint4.py:
//   k[t, c] = q4(c) * s8[t, c / g]  (same for v), nibbles two per byte (even channel low),
//   out[h] = softmax_t(cap(scale * q[h] . k[t])) v[t] over t < length, fp32 throughout
//   (cap: the optional logit soft-capping, DecodeParams::softcap). Values may have a head size of
//   their own (DecodeParams::dv), quantized with the keys' group.
// One task per (batch, kv head) serves the group's query heads, so each cache byte is read once.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace fastlayers::kvint4 {

// Several query tokens (prefill, q_tokens > 1): query token i of the call is the cache's token
// end - q_tokens + i (end: length, or the row's lengths[b]) and sees the cached tokens up to it
// (causal).
struct DecodeParams {
  const float* q = nullptr;             // [batch, hq, q_tokens, d] contiguous (CPU: or null, q16)
  const uint8_t* k = nullptr;           // [batch, hkv, t_max, d / 2]
  const fp8e4m3_t* k_scale = nullptr;   // [batch, hkv, t_max, d / group]
  const uint8_t* v = nullptr;           // [batch, hkv, t_max, dv / 2]
  const fp8e4m3_t* v_scale = nullptr;   // [batch, hkv, t_max, dv / group]
  float* out = nullptr;                 // [batch, hq, q_tokens, dv] (CPU: or null, out16)
  float* lse = nullptr;                 // [batch, hq, q_tokens]
  float* workspace = nullptr;           // CUDA only: decode_cuda_workspace_floats(...) floats
  // CUDA, optional: q in its own 16-bit dtype (same layout as q). With head_dim 64 or 128 the
  // tensor-core prefill and decode then take it as it is (INT4 x FP8-scale values are exact in fp16
  // and bf16): one product per score and output term, where fp32 q takes two (hi + lo).
  // CPU: the queries when q is null (read as they are, no fp32 copy).
  const void* q16 = nullptr;
  DType q16_dtype = DType::kBFloat16;
  // CPU: the output in q16_dtype when out is null (rounded once from fp32: the same values as out
  // followed by a cast). The CUDA kernels take fp32 q and out.
  void* out16 = nullptr;
  // Optional: starts[b], the first cached token batch row b attends to (left padding: tokens
  // [0, starts[b]) are skipped; clamped to [0, length]; a query row that sees no token, decode or
  // a prefill query at a padding position, gets zeros and lse -inf). Null: every row attends to
  // tokens [0, length) (causally, in prefill).
  const int32_t* starts = nullptr;
  int64_t batch = 0, hq = 0, hkv = 0, d = 0, group = 0, t_max = 0, length = 0, q_tokens = 1;
  // The values' head size: 0 for d, else a multiple of group (CUDA: a multiple of 64, at most d,
  // or 512 with d 576).
  int64_t dv = 0;
  // Elements from one value token to the next in v and in v_scale (batch rows and heads
  // t_max tokens apart, as in the keys); 0 for dv / 2 and dv / group, values in buffers of their
  // own. Multi-head latent attention's latent is the keys' first dv channels (its keys are the
  // latent and the RoPE part): v = k, v_scale = k_scale, v_row = d / 2, v_scale_row = d / group.
  int64_t v_row = 0, v_scale_row = 0;
  float scale = 1.0f;
  // Logit soft-capping (Gemma 2), when > 0: each scaled score s becomes softcap * tanh(s / softcap)
  // before the softmax. 0: none.
  float softcap = 0.0f;
  // CUDA decode: the cached tokens' splits (flash-decoding), each a CTA's range whose softmax
  // states merge after; 0 for one per 256 tokens. At most kMaxDecodeSplits and one per token
  // (larger requests are clamped). The workspace must be decode_cuda_workspace_floats(..., splits).
  // The CPU kernel and the prefill ignore it.
  int64_t splits = 0;
  // Optional: lengths[b], the end of batch row b's cached tokens (clamped to [0, length]): its
  // decode attends to tokens [first_token, lengths[b]); in prefill its query token i is the cache's
  // token lengths[b] - q_tokens + i (a query before token 0 sees none). Null: length for every row.
  const int32_t* lengths = nullptr;
  // Optional: a paged cache (vLLM's block tables, FlashInfer's HND pages).
  // k, k_scale, v and v_scale are then pages [pages, hkv, page_size, .] (rows as above), and token
  // t of batch row b sits in page block_table[b * block_stride + t / page_size], slot
  // t % page_size (page indices clamped to [0, pages)); page_size a power of two; length at most
  // block_stride * page_size; t_max unused. Null: the contiguous cache above.
  const int32_t* block_table = nullptr;
  int64_t block_stride = 0, page_size = 0, pages = 0;
  // Optional, prefill (q_tokens > 1): q_lens[b], batch row b's query tokens (clamped to
  // [0, q_tokens]): its query i < q_lens[b] is the cache's token end - q_lens[b] + i, the ones
  // past it are padding (they see no token: zeros, lse -inf). Null: q_tokens for every row.
  const int32_t* q_lens = nullptr;
  // Optional, prefill instead of q_lens: ragged queries (FlashAttention's cu_seqlens_q, FlashInfer's
  // qo_indptr). q, out and lse are then rows [q_total, hq] (token-major: q [q_total, hq, d]) and
  // batch row b's queries are tokens q_starts[b] .. q_starts[b + 1] - 1 (q_starts: batch + 1
  // non-decreasing entries from 0 to at most q_total); its query i is the cache's token
  // end - count + i. q_tokens is the longest row's count (FlashAttention's max_seqlen_q: the grid);
  // a row's queries past it, and rows of q outside [q_starts[0], q_starts[batch]), are not written.
  // Null: the [batch, hq, q_tokens] layout.
  const int32_t* q_starts = nullptr;
  int64_t q_total = 0;
};

// Cache write: rows x[r] ([rows, d], rows ordered [batch, heads, tokens]), optionally rotated by
// RoPE first, times the post-RoPE scale of their head (optional), quantized to INT4 per group of
// `group` channels with an FP8 scale fp8(max|x| / 7) (at least 2^-9), packed two per byte (even
// channel in the low nibble). RoPE, with cos/sin given: x_rot[c] = x[c] cos[c] + rot(x)[c] sin[c],
// rot(x)[c] = -x[c + d/2] / x[c - d/2] (half pairing, Hugging Face rotate_half) or -x[c + 1] /
// x[c - 1] for even / odd c (interleaved); the products are exact in double and the sum is rounded
// once to fp32, so the result does not depend on FMA contraction.
struct QuantizeParams {
  const void* x = nullptr;              // [rows, d] contiguous
  const float* post_scale = nullptr;    // [heads, d] or null
  const float* cos = nullptr;           // [cos_batch, tokens, d] or null (then sin is null too)
  const float* sin = nullptr;
  int64_t cos_batch_stride = 0;         // tokens * d, or 0 when one table serves every batch row
  bool interleaved = false;             // RoPE pairing: (2i, 2i + 1) instead of (c, c + d/2)
  uint8_t* packed = nullptr;            // [rows, d / 2], or a cache buffer (out_tokens below)
  fp8e4m3_t* scales = nullptr;          // [rows, d / group], likewise
  int64_t rows = 0, d = 0, group = 0, tokens = 1, heads = 1;
  DType dtype = DType::kFloat32;
  // Cache write in place: with out_tokens > 0, packed and scales are [batch, heads, out_tokens, .]
  // cache buffers and row r (batch-head r / tokens, token r % tokens) goes to their token
  // out_start + r % tokens (out_start + tokens <= out_tokens). 0: row r goes to row r.
  int64_t out_tokens = 0, out_start = 0;
  // Paged cache write instead (slots set; tokens == 1, out_tokens == 0): packed and scales are
  // pages [num_slots / page_size, heads, page_size, .] and row r (token n = r / heads, head
  // h = r % heads) goes to slot s = slots[n]: page s / page_size, its row s % page_size. A slot
  // outside [0, num_slots) writes nothing (vLLM's -1 for a padding token).
  const int64_t* slots = nullptr;
  int64_t page_size = 0, num_slots = 0;
  // The query side instead (q_out set; packed, scales and the out_* fields unused; group == d):
  // the rotated, scaled rows in fp32, through FP8-E4M3 first when q_fp8, with one scale per row,
  // max|row| / 448 (1 for an all-zero row): q_out[r] = fp8(row / s) * s (the reference's
  // quantize_q_fp8; the attention kernels take these fp32 values).
  float* q_out = nullptr;               // [rows, d]
  bool q_fp8 = true;
};

#if defined(__CUDACC__)
#define FL_KVINT4_HD __host__ __device__
#else
#define FL_KVINT4_HD
#endif

// The packed/scales row that row r of a cache write goes to; -1: none (a paged write's slot out
// of range).
inline FL_KVINT4_HD int64_t output_row(const QuantizeParams& p, int64_t r) {
  if (p.slots != nullptr) {
    const int64_t s = p.slots[r / p.heads];
    if (s < 0 || s >= p.num_slots) return -1;
    return ((s / p.page_size) * p.heads + r % p.heads) * p.page_size + s % p.page_size;
  }
  return p.out_tokens > 0 ? (r / p.tokens) * p.out_tokens + p.out_start + r % p.tokens : r;
}

// The values' head size (DecodeParams::dv, 0 meaning d).
inline FL_KVINT4_HD int64_t value_dim(const DecodeParams& p) { return p.dv > 0 ? p.dv : p.d; }

// The elements from one value token to the next (DecodeParams::v_row, v_scale_row, 0 meaning
// dense rows).
inline FL_KVINT4_HD int64_t value_row(const DecodeParams& p) { return p.v_row > 0 ? p.v_row : value_dim(p) / 2; }
inline FL_KVINT4_HD int64_t value_scale_row(const DecodeParams& p) {
  return p.v_scale_row > 0 ? p.v_scale_row : value_dim(p) / p.group;
}

// Decode: the first cached token batch row b attends to (starts[b] clamped to [0, length]; 0
// without starts).
inline FL_KVINT4_HD int64_t first_token(const DecodeParams& p, int64_t b) {
  const int64_t first = p.starts != nullptr ? p.starts[b] : 0;
  return first < 0 ? 0 : (first > p.length ? p.length : first);
}

// The end of batch row b's cached tokens (lengths[b] clamped to [0, length]; length without
// lengths).
inline FL_KVINT4_HD int64_t end_token(const DecodeParams& p, int64_t b) {
  const int64_t end = p.lengths != nullptr ? p.lengths[b] : p.length;
  return end < 0 ? 0 : (end > p.length ? p.length : end);
}

// Prefill: batch row b's query tokens (q_lens[b] or q_starts[b + 1] - q_starts[b], clamped to
// [0, q_tokens]; q_tokens without either).
inline FL_KVINT4_HD int64_t query_count(const DecodeParams& p, int64_t b) {
  if (p.q_lens == nullptr && p.q_starts == nullptr) return p.q_tokens;
  const int64_t n = p.q_lens != nullptr ? p.q_lens[b] : int64_t{p.q_starts[b + 1]} - p.q_starts[b];
  return n < 0 ? 0 : (n > p.q_tokens ? p.q_tokens : n);
}

// Prefill: the row of q (d wide), out (dv wide) and lse that query token i of batch row b, query
// head h is: (b * hq + h) * q_tokens + i, or ragged (q_starts) (q_starts[b] + i) * hq + h.
// Consecutive query tokens of a head are query_step rows apart.
inline FL_KVINT4_HD int64_t query_row(const DecodeParams& p, int64_t b, int64_t h, int64_t i) {
  return p.q_starts != nullptr ? (p.q_starts[b] + i) * p.hq + h : (b * p.hq + h) * p.q_tokens + i;
}
inline FL_KVINT4_HD int64_t query_step(const DecodeParams& p) { return p.q_starts != nullptr ? p.hq : 1; }

// Prefill: the last cached token query i of batch row b sees (its causal limit: the row's end less
// its query tokens, plus i); -1 for a padding query (i >= query_count: no token).
inline FL_KVINT4_HD int64_t query_limit(const DecodeParams& p, int64_t b, int64_t i) {
  const int64_t count = query_count(p, b);
  return i < count ? end_token(p, b) - count + i : -1;
}

// Prefill: how many of query tokens [i0, i0 + n) of batch row b hold a query (the first ones; the
// rest are padding).
inline FL_KVINT4_HD int64_t query_rows(const DecodeParams& p, int64_t b, int64_t i0, int64_t n) {
  const int64_t left = query_count(p, b) - i0;
  return left < 0 ? 0 : (left < n ? left : n);
}

// Prefill: one past the last cached token any of query tokens [i0, i0 + n) of batch row b sees
// (0 when they are all padding).
inline FL_KVINT4_HD int64_t query_keys(const DecodeParams& p, int64_t b, int64_t i0, int64_t n) {
  const int64_t rows = query_rows(p, b, i0, n);
  return rows > 0 ? end_token(p, b) - query_count(p, b) + i0 + rows : 0;
}

// Where the cached tokens of one (batch row, kv head) are: token t's row of the cache buffers (k +
// row * d / 2, k_scale + row * d / group, v + row * value_row, ...). Contiguous: base + t. Paged:
// its page's rows, the kv head's slots.
struct TokenRows {
  const int32_t* table = nullptr;  // paged: the batch row's block table; null: contiguous
  int64_t base = 0;                // contiguous: (b * hkv + h) * t_max; paged: h * page_size
  int64_t page_rows = 0;           // paged: hkv * page_size, the rows of one page
  int64_t last_page = 0;           // paged: pages - 1
  int64_t mask = 0;                // paged: page_size - 1
  int shift = 0;                   // paged: log2(page_size)
  FL_KVINT4_HD int64_t operator()(int64_t t) const {
    if (table == nullptr) return base + t;
    const int64_t page = table[t >> shift];
    return (page < 0 ? 0 : (page > last_page ? last_page : page)) * page_rows + base + (t & mask);
  }
  // The tokens from t on in consecutive rows: to the end of t's page (paged), all of them else.
  FL_KVINT4_HD int64_t run(int64_t t) const { return table == nullptr ? INT64_MAX : mask + 1 - (t & mask); }
};

// A contiguous cache's rows alone (TokenRows without the paged branch and its registers: the
// tensor-core prefills, at up to 255 registers, take one or the other as a template argument).
struct ContiguousRows {
  int64_t base = 0;  // (b * hkv + h) * t_max
  FL_KVINT4_HD int64_t operator()(int64_t t) const { return base + t; }
};

inline FL_KVINT4_HD ContiguousRows contiguous_rows(const DecodeParams& p, int64_t b, int64_t h) {
  return ContiguousRows{(b * p.hkv + h) * p.t_max};
}

inline FL_KVINT4_HD TokenRows token_rows(const DecodeParams& p, int64_t b, int64_t h) {
  TokenRows r;
  if (p.block_table == nullptr) {
    r.base = contiguous_rows(p, b, h).base;
    return r;
  }
  r.table = p.block_table + b * p.block_stride;
  r.base = h * p.page_size;
  r.page_rows = p.hkv * p.page_size;
  r.last_page = p.pages - 1;
  r.mask = p.page_size - 1;
  while ((int64_t{1} << r.shift) < p.page_size) ++r.shift;
  return r;
}

// token_rows (kPaged) or ContiguousRows of (batch row b, kv head h).
template <bool kPaged>
FL_KVINT4_HD auto cache_rows(const DecodeParams& p, int64_t b, int64_t h) {
  if constexpr (kPaged) {
    return token_rows(p, b, h);
  } else {
    return contiguous_rows(p, b, h);
  }
}

Status validate(const DecodeParams& p);
Status validate(const QuantizeParams& p);
Status decode_cpu(const DecodeParams& p);
Status quantize_cpu(const QuantizeParams& p);

// CUDA (kvint4_cuda.cu): split-KV decode (an even head_dim up to 256 with values of an even
// number of channels no wider than the keys (dv 0: d), or multi-head latent attention's
// 576-channel keys and 512-channel values; any GQA group; on tensor cores for head_dim 64 / 128 /
// 256 with dv == d, 192 / 128 and 576 / 512, with groups of a multiple of 16 channels), causal
// prefill (q_tokens > 1, same head dims, no workspace: on tensor cores for the shapes of
// cuda::tc::with_dims and 576 / 512 with the values in the key rows, one warp per query row
// otherwise) and the cache write (any shape the CPU kernel takes).
bool decode_cuda_supported(int64_t hq, int64_t hkv, int64_t d, int64_t dv, int64_t batch);
inline constexpr int64_t kMaxDecodeSplits = 64;
int64_t decode_cuda_workspace_floats(int64_t batch, int64_t hq, int64_t dv, int64_t length, int64_t splits = 0);
Status decode_cuda(const DecodeParams& p, void* stream);
Status quantize_cuda(const QuantizeParams& p, void* stream);

}  // namespace fastlayers::kvint4
