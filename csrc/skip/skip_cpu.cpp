// SPDX-License-Identifier: Apache-2.0
#include <cstring>
#include <vector>

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
  if (!(p.softcap >= 0.0f) || p.softcap > 3.0e38f) {  // (NaN fails the first test)
    return Status::invalid("varlen_attention: softcap must be finite and >= 0 (0: none)");
  }
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

Status validate_backward(const VarlenBwdParams& p) {
  if (Status s = validate_inputs(p.fwd); !s.is_ok()) return s;
  if (p.fwd.nq > 0 && (p.out == nullptr || p.dout == nullptr || p.lse == nullptr || p.dq == nullptr ||
                       (p.fwd.nk > 0 && (p.dk == nullptr || p.dv == nullptr)))) {
    return Status::invalid("varlen_attention_backward: null pointer argument");
  }
  return Status::ok();
}

Status varlen_attention_backward_cpu(const VarlenBwdParams& p) {
  if (Status s = validate_backward(p); !s.is_ok()) return s;
  if (p.fwd.nq == 0) return Status::ok();
  FL_CPU_DISPATCH(skip, varlen_attention_backward, p)
}

// ---- Routed rows -------------------------------------------------------------------------------

// (messages are static strings: Status keeps the pointer)
static Status validate_rows(const RowsParams& p, bool needs_rows) {
  if (!is_float_activation(p.dtype)) return Status::invalid("gather_rows / scatter_add_gated: dtype must be float32, float16 or bfloat16");
  if (p.n < 0 || p.m < 0 || p.dim <= 0) return Status::invalid("gather_rows / scatter_add_gated: bad sizes");
  if ((p.m > 0 && (p.idx == nullptr || p.y == nullptr || (needs_rows && p.rows == nullptr))) ||
      (p.n > 0 && p.x == nullptr)) {
    return Status::invalid("gather_rows / scatter_add_gated: null pointer argument");
  }
  for (int64_t i = 0; i < p.m; ++i) {
    if (p.idx[i] >= p.n) return Status::invalid("gather_rows / scatter_add_gated: an index is >= the number of rows");
  }
  return Status::ok();
}

namespace {

template <typename T>
void gather_typed(const RowsParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const size_t row_bytes = static_cast<size_t>(p.dim) * sizeof(T);
#pragma omp parallel for schedule(static) if (p.m * p.dim >= (1 << 16))
  for (int64_t i = 0; i < p.m; ++i) {
    if (p.idx[i] >= 0) {
      std::memcpy(y + i * p.dim, x + p.idx[i] * p.dim, row_bytes);
    } else {
      for (int64_t j = 0; j < p.dim; ++j) store_as(y + i * p.dim + j, 0.0f);
    }
  }
}

template <typename T>
void scatter_typed(const RowsParams& p) {
  const T* res = static_cast<const T*>(p.x);
  const T* out = static_cast<const T*>(p.rows);
  T* y = static_cast<T*>(p.y);
  if (y != res) std::memcpy(y, res, static_cast<size_t>(p.n * p.dim) * sizeof(T));
#pragma omp parallel for schedule(static) if (p.m * p.dim >= (1 << 16))
  for (int64_t i = 0; i < p.m; ++i) {
    const int64_t r = p.idx[i];
    if (r < 0) continue;
    const double g = p.gate != nullptr ? p.gate[i] : 1.0;
    for (int64_t j = 0; j < p.dim; ++j) {
      const double v = static_cast<double>(to_float(res[r * p.dim + j])) +
                       static_cast<double>(to_float(out[i * p.dim + j])) * g;
      store_as(y + r * p.dim + j, static_cast<float>(v));
    }
  }
}

template <typename T>
void scatter_backward_typed(const RowsParams& p) {
  const T* dy = static_cast<const T*>(p.x);
  const T* out = static_cast<const T*>(p.rows);
  T* d_out = static_cast<T*>(p.y);
#pragma omp parallel for schedule(static) if (p.m * p.dim >= (1 << 16))
  for (int64_t i = 0; i < p.m; ++i) {
    const int64_t r = p.idx[i];
    const double g = p.gate != nullptr ? p.gate[i] : 1.0;
    double dot = 0.0;
    for (int64_t j = 0; j < p.dim; ++j) {
      const double d = r >= 0 ? static_cast<double>(to_float(dy[r * p.dim + j])) : 0.0;
      store_as(d_out + i * p.dim + j, static_cast<float>(d * g));
      dot += d * static_cast<double>(to_float(out[i * p.dim + j]));
    }
    if (p.d_gate != nullptr) p.d_gate[i] = static_cast<float>(dot);
  }
}

template <template <typename> class Op>
Status by_dtype(const RowsParams& p) {
  switch (p.dtype) {
    case DType::kFloat32:
      Op<float>::run(p);
      break;
    case DType::kFloat16:
      Op<half_t>::run(p);
      break;
    case DType::kBFloat16:
      Op<bf16_t>::run(p);
      break;
    default:
      return Status::invalid("rows: dtype must be float32, float16 or bfloat16");
  }
  return Status::ok();
}

template <typename T>
struct Gather {
  static void run(const RowsParams& p) { gather_typed<T>(p); }
};
template <typename T>
struct Scatter {
  static void run(const RowsParams& p) { scatter_typed<T>(p); }
};
template <typename T>
struct ScatterBackward {
  static void run(const RowsParams& p) { scatter_backward_typed<T>(p); }
};

}  // namespace

Status gather_rows_cpu(const RowsParams& p) {
  if (Status s = validate_rows(p, false); !s.is_ok()) return s;
  return by_dtype<Gather>(p);
}

// Each row is updated from the residual, so a row named twice would keep one update and lose the
// other (the reference's index_put is undefined there too): refused. (CUDA does not check: that
// would need the host; the routing ops give unique indices.)
static Status check_unique_rows(const RowsParams& p) {
  std::vector<unsigned char> seen(static_cast<size_t>(p.n), 0);
  for (int64_t i = 0; i < p.m; ++i) {
    const int64_t r = p.idx[i];
    if (r < 0) continue;
    if (seen[r]) return Status::invalid("scatter_add_gated: indices must be unique (a row appears twice)");
    seen[r] = 1;
  }
  return Status::ok();
}

Status scatter_add_gated_cpu(const RowsParams& p) {
  if (Status s = validate_rows(p, true); !s.is_ok()) return s;
  if (p.n > 0 && p.y == nullptr) return Status::invalid("scatter_add_gated: null output");
  if (Status s = check_unique_rows(p); !s.is_ok()) return s;
  return by_dtype<Scatter>(p);
}

Status scatter_add_gated_backward_cpu(const RowsParams& p) {
  if (Status s = validate_rows(p, true); !s.is_ok()) return s;
  return by_dtype<ScatterBackward>(p);
}

}  // namespace fastlayers::skip
