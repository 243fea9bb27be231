// SPDX-License-Identifier: Apache-2.0
#include "common/cpu_isa.h"
#include "kvint4/kvint4.h"

namespace fastlayers::cpu {
#define FL_DECLARE_KVINT4(isa)                                        \
  namespace isa::kvint4 {                                             \
  Status decode(const fastlayers::kvint4::DecodeParams& p);           \
  Status quantize(const fastlayers::kvint4::QuantizeParams& p);       \
  }
FL_DECLARE_KVINT4(scalar)
FL_DECLARE_KVINT4(avx2)
FL_DECLARE_KVINT4(avx512)
#undef FL_DECLARE_KVINT4
}  // namespace fastlayers::cpu

namespace fastlayers::kvint4 {

Status validate(const DecodeParams& p) {
  if (p.batch < 0 || p.hq <= 0 || p.hkv <= 0 || p.hq % p.hkv || p.d <= 0 || p.d % 2 || p.group <= 0 ||
      p.group % 2 || p.d % p.group || p.dv < 0 || value_dim(p) % p.group || p.v_row < 0 || p.v_scale_row < 0 ||
      value_row(p) < value_dim(p) / 2 || value_scale_row(p) < value_dim(p) / p.group || p.length < 0 ||
      (p.block_table == nullptr && p.length > p.t_max) || p.q_tokens < 1 || p.q_tokens > (p.length > 0 ? p.length : 1)) {
    return Status::invalid(
        "int4_kv_decode: bad sizes (need hq % hkv == 0, d and dv multiples of an even group, value rows at "
        "least dv wide)");
  }
  if ((p.q_lens != nullptr || p.q_starts != nullptr) && p.q_tokens < 2) {
    return Status::invalid(
        "int4_kv_decode: per-row query counts (q_lens, q_starts) are for prefill (q_tokens > 1)");
  }
  if (p.q_lens != nullptr && p.q_starts != nullptr) {
    return Status::invalid("int4_kv_decode: q_lens and q_starts are two layouts: give one");
  }
  if (p.q_starts != nullptr && p.q_total < 0) return Status::invalid("int4_kv_decode: q_total must be >= 0");
  if (p.batch > 0 && (p.q == nullptr || p.out == nullptr) && p.q16_dtype != DType::kFloat16 &&
      p.q16_dtype != DType::kBFloat16) {
    return Status::invalid("int4_kv_decode: 16-bit queries or output must be float16 or bfloat16");
  }
  if (p.batch > 0 && ((p.q == nullptr && p.q16 == nullptr) || (p.out == nullptr && p.out16 == nullptr) || p.lse == nullptr ||
                      (p.length > 0 && (p.k == nullptr || p.v == nullptr || p.k_scale == nullptr || p.v_scale == nullptr)))) {
    return Status::invalid("int4_kv_decode: null pointer argument");
  }
  if (p.block_table != nullptr &&
      (p.page_size <= 0 || (p.page_size & (p.page_size - 1)) || p.block_stride <= 0 || p.pages <= 0 ||
       p.length > p.block_stride * p.page_size)) {
    return Status::invalid(
        "int4_kv_decode: bad paged cache (need a power-of-two page_size, pages > 0, length <= "
        "block_stride * page_size)");
  }
  if (p.splits < 0) return Status::invalid("int4_kv_decode: splits must be >= 0 (0: by the length)");
  if (!(p.softcap >= 0.0f) || p.softcap > 3.0e38f) {  // (NaN fails the first test)
    return Status::invalid("int4_kv_decode: softcap must be finite and >= 0 (0: none)");
  }
  return Status::ok();
}

Status decode_cpu(const DecodeParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.batch == 0) return Status::ok();
  FL_CPU_DISPATCH(kvint4, decode, p)
}

Status validate(const QuantizeParams& p) {
  if (!is_float_activation(p.dtype)) return Status::invalid("kv_quantize: dtype must be float32, float16 or bfloat16");
  // tokens and heads index the RoPE tables: positive whenever there are rows (a batch without
  // tokens or heads has none).
  if (p.rows < 0 || p.d <= 0 || p.group <= 0 || p.group % 2 || p.d % p.group || p.tokens < 0 || p.heads < 0 ||
      (p.rows > 0 && (p.tokens == 0 || p.heads == 0))) {
    return Status::invalid("kv_quantize: bad sizes (need d a multiple of an even group)");
  }
  if (p.q_out != nullptr ? p.group != p.d || p.out_tokens != 0
                         : p.out_tokens < 0 || (p.out_tokens > 0 && (p.out_start < 0 || p.out_start > p.out_tokens - p.tokens))) {
    return Status::invalid("kv_quantize: bad output rows (cache tokens, start) or query-side group");
  }
  if (p.slots != nullptr &&
      (p.q_out != nullptr || p.out_tokens != 0 || p.tokens != 1 || p.page_size <= 0 || p.num_slots < 0 ||
       p.num_slots % p.page_size)) {
    return Status::invalid("kv_quantize: a paged write needs one token per row, a page size and whole pages");
  }
  if (p.rows > 0 && (p.x == nullptr || (p.q_out == nullptr && (p.packed == nullptr || p.scales == nullptr)))) {
    return Status::invalid("kv_quantize: null pointer argument");
  }
  if ((p.cos == nullptr) != (p.sin == nullptr)) return Status::invalid("kv_quantize: cos and sin go together");
  if (p.cos_batch_stride < 0) return Status::invalid("kv_quantize: negative cos batch stride");
  return Status::ok();
}

Status quantize_cpu(const QuantizeParams& p) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.rows == 0) return Status::ok();
  FL_CPU_DISPATCH(kvint4, quantize, p)
}

}  // namespace fastlayers::kvint4
