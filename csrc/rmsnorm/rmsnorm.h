// SPDX-License-Identifier: Apache-2.0
// Fused RMSNorm launchers: raw pointers, sizes, strides (in elements), a stream; they return a Status.
//
//   s  = x (+ residual, rounded to the storage dtype)                 rows x cols, fp32/fp16/bf16
//   r  = 1 / sqrt(mean(s^2) + eps)                                   fp32, per row
//   y  = round(round(s * r) * w)              weight_offset == 0     (Llama / HF rounding)
//   y  = round(s * r * (weight_offset + w))   weight_offset != 0     (Gemma: everything in fp32)
//                                             or round_once          (torch.nn.RMSNorm: offset 0)
//   fp8 output: y32 = s * r * w, scale = max|y32| / 448 (1 for an all-zero row),
//               y = fp8(clamp(y32 / scale, -448, 448))
//
// The Python layer (python/fastlayers/ops/rmsnorm.py) validates, allocates every output and workspace,
// and is the only caller. Kernels never allocate or synchronise.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace fastlayers::rmsnorm {

struct FwdParams {
  const void* x = nullptr;          // [rows, cols], row stride x_row_stride, unit column stride
  int64_t x_row_stride = 0;
  const void* residual = nullptr;   // optional [rows, cols], same dtype as x
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;     // [cols] contiguous, dtype x_dtype or fp32
  void* y = nullptr;                // [rows, cols] contiguous, dtype y_dtype (x_dtype or fp8 e4m3)
  void* residual_out = nullptr;     // [rows, cols] contiguous, x_dtype; required iff residual
  float* y_scale = nullptr;         // [rows] fp32; required iff y_dtype is fp8
  int64_t rows = 0;
  int64_t cols = 0;
  DType x_dtype = DType::kFloat32;
  DType weight_dtype = DType::kFloat32;
  DType y_dtype = DType::kFloat32;
  float eps = 1e-6f;
  float weight_offset = 0.0f;
  bool round_once = false;          // multiply by the weight in fp32, round once (torch.nn.RMSNorm)
  bool fresh_output = false;        // y and residual_out were just allocated (CPU: plain stores)
};

// NOTE(rstd): the backward recomputes r instead of reading a saved one: it reads s in the same pass
// anyway, so this costs no memory traffic and the forward needs no extra output.
// dx = r * g - s * r^3 * mean(g * s) (+ d_residual_out), with g = dy * w_eff in fp32;
// dw = sum over rows of dy * n, n = round(s * r) (Llama) or s * r (Gemma, round_once), in fp32 in
// `num_partials` fixed row chunks and then reduced in a fixed order: deterministic.
struct BwdParams {
  const void* dy = nullptr;             // [rows, cols] contiguous, x_dtype
  const void* x = nullptr;              // [rows, cols], row stride x_row_stride (s for the fused add)
  int64_t x_row_stride = 0;
  const void* weight = nullptr;         // [cols]
  const void* d_residual_out = nullptr; // optional [rows, cols] contiguous, x_dtype; added to dx
  void* dx = nullptr;                   // [rows, cols] contiguous, x_dtype
  void* dw = nullptr;                   // [cols], weight_dtype
  float* dw_partial = nullptr;          // workspace [num_partials, cols] fp32 (contents ignored)
  int64_t num_partials = 1;             // 1 <= num_partials <= max(rows, 1)
  int64_t rows = 0;
  int64_t cols = 0;
  DType x_dtype = DType::kFloat32;
  DType weight_dtype = DType::kFloat32;
  float eps = 1e-6f;
  float weight_offset = 0.0f;
  bool round_once = false;              // dw uses n = s * r (the forward rounded once)
};

// Checks shared by every backend: supported dtype pairs, pointer presence, sizes.
Status validate(const FwdParams& p);
Status validate(const BwdParams& p);

Status forward_cpu(const FwdParams& p);
Status backward_cpu(const BwdParams& p);

// `stream` is a cudaStream_t; declared as void* so this header stays free of CUDA.
Status forward_cuda(const FwdParams& p, void* stream);
Status backward_cuda(const BwdParams& p, void* stream);

}  // namespace fastlayers::rmsnorm
