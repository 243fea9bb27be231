// SPDX-License-Identifier: Apache-2.0
// Hopper INT4 x FP8 GEMM: device-side prepack (no host round trip, no synchronisation), the same
// prepack on the host for tests, and the dispatch over the generated tile configurations by the
// number of token rows (each splits K by sm90_split_k). The kernels themselves: gemm_sm90.cuh, one
// instantiation per generated file.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "int4_fp8/int4_fp8.h"
#include "int4_fp8/sm90/layout_sm90.cuh"

namespace fastlayers::int4_fp8 {
namespace sm90 {

// Declarations of the generated instantiations (configs_sm90.inc: X(name, out dtype, token tile)).
#define FL_SM90_DECLARE(name, dtype, tok)                                      \
  Status run_##name(const Sm90GemmParams& p, int sm_count, cudaStream_t stream); \
  size_t workspace_##name(const Sm90GemmParams& p, int sm_count);                \
  bool can_implement_##name(const Sm90GemmParams& p, int sm_count);             \
  int splits_##name(const Sm90GemmParams& p, int sm_count);
#include "int4_fp8/sm90/configs_sm90.inc"
#undef FL_SM90_DECLARE

namespace {

struct ConfigEntry {
  const char* name;
  DType dtype;
  int tok;  // token tile: the configuration for up to this many rows (the largest for any m)
  Status (*run)(const Sm90GemmParams&, int, cudaStream_t);
  size_t (*workspace)(const Sm90GemmParams&, int);
  bool (*can_implement)(const Sm90GemmParams&, int);
  int (*splits)(const Sm90GemmParams&, int);
};

constexpr ConfigEntry kConfigs[] = {
#define FL_SM90_DECLARE(name, dtype, tok) \
  {#name, DType::dtype, tok, run_##name, workspace_##name, can_implement_##name, splits_##name},
#include "int4_fp8/sm90/configs_sm90.inc"
#undef FL_SM90_DECLARE
};

// The smallest token tile that holds all m rows (least padding), else the largest tile.
const ConfigEntry* pick(int64_t m, DType dtype) {
  const ConfigEntry* fit = nullptr;
  const ConfigEntry* largest = nullptr;
  for (const ConfigEntry& c : kConfigs) {
    if (c.dtype != dtype) continue;
    if (c.tok >= m && (fit == nullptr || c.tok < fit->tok)) fit = &c;
    if (largest == nullptr || c.tok > largest->tok) largest = &c;
  }
  return fit != nullptr ? fit : largest;
}

int sm_count(int device) {  // 0: CUTLASS queries it
  return cuda::device_attribute<cudaDevAttrMultiProcessorCount>(device);
}


// One thread per source byte: the pair (k, k + 1), k even, lands in one destination byte (the atom
// keeps k % 2 in the lowest offset bit), so bytes map to bytes and no two threads share one.
__global__ void prepack_weight_kernel(const uint8_t* __restrict__ q, uint8_t* __restrict__ out,
                                      int n, int k) {
  const LayoutW layout = weight_layout(n, k);
  const int64_t bytes = static_cast<int64_t>(n) * (k / 2);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(i / (k / 2));
    const int col = 2 * static_cast<int>(i % (k / 2));
    const uint32_t b = q[i];
    const uint32_t enc = lut_encode_nibble(b & 15u) | (lut_encode_nibble(b >> 4) << 4);
    out[static_cast<int64_t>(layout(row, col, 0)) / 2] = static_cast<uint8_t>(enc);
  }
}

// lut[j, c] = {fp8(-8 s), .., fp8(-2 s), -s} for s = group_scale[c, j]; one thread per scale.
__global__ void prepack_scale_kernel(const uint8_t* __restrict__ s8, uint8_t* __restrict__ lut,
                                     int64_t n, int64_t groups) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i / groups, j = i % groups;
    const uint8_t code = s8[i];
    const float s = __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
    uint8_t v[8];
#pragma unroll
    for (int t = 0; t < 7; ++t) v[t] = cuda::to_fp8e4m3(-static_cast<float>(8 - t) * s);
    v[7] = static_cast<uint8_t>(code ^ 0x80u);
    uint2 word;
    word.x = v[0] | (v[1] << 8) | (v[2] << 16) | (uint32_t(v[3]) << 24);
    word.y = v[4] | (v[5] << 8) | (v[6] << 16) | (uint32_t(v[7]) << 24);
    reinterpret_cast<uint2*>(lut)[j * n + c] = word;
  }
}

Status check_prepack(const PrepackParams& p) {
  if (p.qweight == nullptr || p.group_scale == nullptr || p.packed_weight == nullptr ||
      p.lut_scale == nullptr) {
    return Status::invalid("int4_fp8_prepack_sm90: null pointer argument");
  }
  if (const char* why = sm90_unsupported_reason(p.n, p.k, p.group_size, DType::kBFloat16)) {
    return Status::invalid(why);
  }
  if (p.n > (int64_t(1) << 30) || p.k > (int64_t(1) << 30)) {
    return Status::invalid("int4_fp8_prepack_sm90: n and k must be below 2^30");
  }
  return Status::ok();
}

}  // namespace
}  // namespace sm90

const char* sm90_unsupported_reason(int64_t n, int64_t k, int64_t group_size, DType out_dtype) {
  if (n <= 0 || n % 16) return "the sm90 GEMM needs out_features to be a positive multiple of 16";
  if (k <= 0 || k % 32) return "the sm90 GEMM needs in_features to be a positive multiple of 32";
  if (group_size != k && group_size % 128) {
    return "the sm90 GEMM needs group_size to be a multiple of 128 or equal to in_features";
  }
  if (out_dtype != DType::kBFloat16 && out_dtype != DType::kFloat16) {
    return "the sm90 GEMM writes bfloat16 or float16";
  }
  if (n * k >= (int64_t(1) << 31)) {  // the layout's offsets (in INT4 elements) are 32-bit
    return "the sm90 GEMM takes weights of fewer than 2^31 elements";
  }
  return nullptr;
}

Status prepack_sm90_cuda(const PrepackParams& p, void* stream) {
  if (Status s = sm90::check_prepack(p); !s.is_ok()) return s;
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t bytes = p.n * (p.k / 2), groups = (p.k + p.group_size - 1) / p.group_size;
  const auto blocks = [](int64_t work) {
    return static_cast<unsigned>((work + 255) / 256 < 65535 ? (work + 255) / 256 : 65535);
  };
  sm90::prepack_weight_kernel<<<blocks(bytes), 256, 0, st>>>(
      p.qweight, p.packed_weight, static_cast<int>(p.n), static_cast<int>(p.k));
  if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  sm90::prepack_scale_kernel<<<blocks(p.n * groups), 256, 0, st>>>(&p.group_scale->bits,
                                                                   p.lut_scale, p.n, groups);
  return cuda::last_launch_status();
}

Status prepack_sm90_host(const PrepackParams& p) {
  if (Status s = sm90::check_prepack(p); !s.is_ok()) return s;
  const int n = static_cast<int>(p.n), k = static_cast<int>(p.k);
  const sm90::LayoutW layout = sm90::weight_layout(n, k);
  for (int row = 0; row < n; ++row) {
    for (int col = 0; col < k; col += 2) {
      const uint32_t b = p.qweight[static_cast<int64_t>(row) * (k / 2) + col / 2];
      const int64_t o = layout(row, col, 0);
      if (o % 2 || layout(row, col + 1, 0) != o + 1) {
        return {StatusCode::kUnsupported, "int4_fp8_prepack_sm90: layout splits a byte"};
      }
      p.packed_weight[o / 2] = static_cast<uint8_t>(sm90::lut_encode_nibble(b & 15u) |
                                                    (sm90::lut_encode_nibble(b >> 4) << 4));
    }
  }
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  for (int64_t c = 0; c < p.n; ++c) {
    for (int64_t j = 0; j < groups; ++j) {
      const fp8e4m3_t code = p.group_scale[c * groups + j];
      const float s = to_float(code);
      uint8_t* v = p.lut_scale + 8 * (j * p.n + c);
      for (int t = 0; t < 7; ++t) v[t] = to_fp8e4m3(-static_cast<float>(8 - t) * s).bits;
      v[7] = static_cast<uint8_t>(code.bits ^ 0x80u);
    }
  }
  return Status::ok();
}

const char* gemm_sm90_config(int64_t m, DType out_dtype) {
  const sm90::ConfigEntry* c = sm90::pick(m, out_dtype);
  return c != nullptr ? c->name : "";
}

bool sm90_split_k_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("FASTLAYERS_SM90_SPLIT_K");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return enabled;
}

int gemm_sm90_splits(const Sm90GemmParams& p) {
  const sm90::ConfigEntry* c = sm90::pick(p.m, p.out_dtype);
  return c != nullptr ? c->splits(p, sm90::sm_count(p.device)) : 1;
}

bool gemm_sm90_can_implement(const Sm90GemmParams& p, int sm_count) {
  const sm90::ConfigEntry* c = sm90::pick(p.m, p.out_dtype);
  return c != nullptr && c->can_implement(p, sm_count);
}

int64_t gemm_sm90_workspace(const Sm90GemmParams& p) {
  const sm90::ConfigEntry* c = sm90::pick(p.m, p.out_dtype);
  if (c == nullptr || sm90_unsupported_reason(p.n, p.k, p.group_size, p.out_dtype)) return 0;
  return static_cast<int64_t>(c->workspace(p, sm90::sm_count(p.device)));
}

Status gemm_sm90_cuda(const Sm90GemmParams& p, void* stream) {
  if (const char* why = sm90_unsupported_reason(p.n, p.k, p.group_size, p.out_dtype)) {
    return Status::invalid(why);
  }
  if (p.m < 0 || p.m > (int64_t(1) << 30) || p.n > (int64_t(1) << 30) || p.k > (int64_t(1) << 30)) {
    return Status::invalid("int4_fp8_gemm_sm90: m, n and k must be below 2^30");
  }
  if (p.xq == nullptr || p.xs == nullptr || p.packed_weight == nullptr || p.lut_scale == nullptr ||
      p.channel_scale == nullptr || p.y == nullptr) {
    return Status::invalid("int4_fp8_gemm_sm90: null pointer argument");
  }
  // TMA: 16-byte aligned bases and row strides.
  if (p.x_row_stride < p.k || p.x_row_stride % 16 || !cuda::is_aligned(p.xq, 16) ||
      !cuda::is_aligned(p.y, 16) || !cuda::is_aligned(p.packed_weight, 16) ||
      !cuda::is_aligned(p.lut_scale, 16)) {
    return Status::invalid(
        "int4_fp8_gemm_sm90: xq, y and the prepacked buffers need 16-byte aligned bases and xq "
        "rows a multiple of 16 bytes apart");
  }
  if (p.m == 0) return Status::ok();
  const sm90::ConfigEntry* c = sm90::pick(p.m, p.out_dtype);
  if (c == nullptr) return Status::unsupported("int4_fp8_gemm_sm90: no configuration compiled");
  return c->run(p, sm90::sm_count(p.device), static_cast<cudaStream_t>(stream));
}

}  // namespace fastlayers::int4_fp8
