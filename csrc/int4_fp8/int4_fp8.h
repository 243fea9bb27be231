// SPDX-License-Identifier: Apache-2.0
// INT4 x FP8 GEMM (FireQ) launchers. Semantics: python/fastlayers/reference/int4_fp8.py.
//   Y[m, n] = out(xs[m] * c[n] * sum_k xq[m, k] * fp8(q[n, k] * s8[n, k / g]) + bias[n])
// with fp32 accumulation. q is INT4 packed two per byte (even k in the low nibble, two's complement),
// s8 the FP8 group scales, c the fp32 channel scales, xq FP8-E4M3 activations with fp32 per-row
// scales xs. The look-up table fp8(q * s8) (16 values per group) is what the kernels multiply by;
// they never materialise a dequantised weight.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace fastlayers::int4_fp8 {

struct GemmParams {
  const fp8e4m3_t* xq = nullptr;       // [m, k], row stride x_row_stride
  int64_t x_row_stride = 0;
  const float* xs = nullptr;           // [m] per-row activation scales
  const uint8_t* qweight = nullptr;    // [n, k / 2] contiguous
  const fp8e4m3_t* group_scale = nullptr;  // [n, ceil(k / group_size)] contiguous
  const float* channel_scale = nullptr;    // [n]
  const void* bias = nullptr;          // [n] in bias_dtype, or null
  DType bias_dtype = DType::kFloat32;
  void* y = nullptr;                   // [m, n] contiguous, out_dtype
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0, group_size = 128;
};

// Dynamic per-row FP8 quantisation: xs[r] = max|x[r, :]| / 448 (1 when the row is all zeros or has
// a NaN), xq[r, :] = fp8(clamp(x[r, :] / xs[r])), computed in fp32.
struct QuantizeParams {
  const void* x = nullptr;             // [rows, cols], row stride x_row_stride, dtype
  int64_t x_row_stride = 0;
  fp8e4m3_t* xq = nullptr;             // [rows, cols] contiguous
  float* xs = nullptr;                 // [rows]
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
};

// fp8(q * s8) as FP8 codes [n, k] (no channel scale): the weight for "dequantize + matmul".
struct DequantParams {
  const uint8_t* qweight = nullptr;        // [n, k / 2] contiguous
  const fp8e4m3_t* group_scale = nullptr;  // [n, ceil(k / group_size)] contiguous
  fp8e4m3_t* out = nullptr;                // [n, k] contiguous
  int64_t n = 0, k = 0, group_size = 128;
};

// Hopper (sm90a) CUTLASS look-up-table GEMM on prepacked weights (csrc/int4_fp8/sm90/). Built only
// when 90a is among the CUDA archs (FASTLAYERS_WITH_SM90). prepack turns the stored format into the
// kernel's: packed_weight [n * k / 2] bytes (CUTLASS's LUT nibble encoding, wgmma-fragment order, see
// sm90/layout_sm90.cuh) and lut_scale [groups, n] x 8 FP8 codes (fp8(-8 s) .. fp8(-2 s), -s per
// group scale s, channels fastest).
struct PrepackParams {
  const uint8_t* qweight = nullptr;        // [n, k / 2] contiguous
  const fp8e4m3_t* group_scale = nullptr;  // [n, groups] contiguous
  uint8_t* packed_weight = nullptr;        // [n * k / 2]
  uint8_t* lut_scale = nullptr;            // [groups, n, 8]
  int64_t n = 0, k = 0, group_size = 128;
};

struct Sm90GemmParams {
  int device = 0;
  const fp8e4m3_t* xq = nullptr;  // [m, k], row stride x_row_stride (16-byte aligned rows)
  int64_t x_row_stride = 0;
  const float* xs = nullptr;             // [m]
  const uint8_t* packed_weight = nullptr;  // from prepack
  const uint8_t* lut_scale = nullptr;      // from prepack
  const float* channel_scale = nullptr;    // [n]
  const float* bias = nullptr;             // [n] fp32, or null
  void* y = nullptr;                       // [m, n] contiguous, bf16 or fp16
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0, group_size = 128;
  void* workspace = nullptr;  // CUTLASS workspace (gemm_sm90_workspace bytes), may be null when 0
  int64_t workspace_bytes = 0;
};

// Split-K factor of the sm90 GEMM for `tiles` output tiles (128 weight rows x a token tile) and
// `k_tiles` K tiles (128 values each) on `sm_count` SMs. A decode-sized problem fills few SMs (at one
// token, 4096 output features are 32 tiles on an H100's 132 SMs) while each tile walks all of K (112
// K tiles for 14336 in-features): then K is split so that about every SM streams weights, each split
// keeping at least kSm90MinKTilesPerSplit K tiles (the pipeline's depth), and the splits' fp32 partial
// sums are reduced in a fixed order (CUTLASS's deterministic split-K). 1 (no split) when the tiles
// alone fill half the SMs.
constexpr int64_t kSm90MinKTilesPerSplit = 4;
inline int sm90_split_k(int64_t tiles, int64_t k_tiles, int sm_count) {
  if (tiles <= 0 || k_tiles <= 0 || sm_count <= 0 || 2 * tiles > sm_count) return 1;
  const int64_t by_sms = sm_count / tiles, by_k = k_tiles / kSm90MinKTilesPerSplit;
  const int64_t splits = by_sms < by_k ? by_sms : by_k;
  return splits > 1 ? static_cast<int>(splits) : 1;
}

// Whether the sm90 GEMM splits K at all: the environment variable FASTLAYERS_SM90_SPLIT_K=0, read
// once, turns it off (every shape then runs data-parallel, one CTA per output tile). The escape
// hatch for CUTLASS's stream-K scheduler, which has hung on mixed-input kernels in other
// configurations (NVIDIA/cutlass#1917); scripts/gpu_check.sh sets it when its split-K probe fails.
bool sm90_split_k_enabled();

// Why the sm90 GEMM cannot take this shape (null when it can): n % 16, k % 32, group_size % 128 or
// == k, out dtype bf16/fp16, n * k < 2^31.
const char* sm90_unsupported_reason(int64_t n, int64_t k, int64_t group_size, DType out_dtype);
Status prepack_sm90_cuda(const PrepackParams& p, void* stream);
Status prepack_sm90_host(const PrepackParams& p);  // the same index maps on the CPU (tests)
Status gemm_sm90_cuda(const Sm90GemmParams& p, void* stream);
int64_t gemm_sm90_workspace(const Sm90GemmParams& p);
// CUTLASS's host-side can_implement for p with the configuration gemm_sm90_cuda would pick and the
// split-K factor of sm_count SMs (no CUDA call: the tests check on the CPU that every shape
// sm90_unsupported_reason accepts is implementable).
bool gemm_sm90_can_implement(const Sm90GemmParams& p, int sm_count);
// Which tile configuration gemm_sm90_cuda uses for m rows (its name, e.g. "bf16_t16").
const char* gemm_sm90_config(int64_t m, DType out_dtype);
// The split-K factor gemm_sm90_cuda uses for p on p.device (sm90_split_k of the picked tile).
int gemm_sm90_splits(const Sm90GemmParams& p);

Status validate(const GemmParams& p);
Status validate(const QuantizeParams& p);

Status gemm_cpu(const GemmParams& p);
Status quantize_cpu(const QuantizeParams& p);
// CUDA (sm80+): the GEMM for any m (efficient for decode, up to ~16 rows), dequantisation,
// quantisation. Asynchronous on `stream`.
Status gemm_cuda(const GemmParams& p, void* stream);
Status dequantize_cuda(const DequantParams& p, void* stream);
Status quantize_cuda(const QuantizeParams& p, void* stream);

}  // namespace fastlayers::int4_fp8
