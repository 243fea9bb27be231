// SPDX-License-Identifier: Apache-2.0
// The one Python module. Thin: turns Python ints into launcher parameters, releases the GIL, and turns
// a launcher Status into a Python exception. Tensors arrive as data pointers; python/fastlayers/ops
// validates them and allocates every output and workspace.
#include <pybind11/pybind11.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/status.h"
#include "fff/fff.h"
#include "int4_fp8/int4_fp8.h"
#include "kvint4/kvint4.h"
#include "peer/peer.h"
#include "rmsnorm/rmsnorm.h"
#include "skip/skip.h"

#ifdef FASTLAYERS_CUDA_EMULATION
namespace fastlayers::cuda_emu_selftest {
const char* run(int which, float* out);  // tests/cuda_emu/selftest.cu
}
namespace emu {
std::vector<std::pair<std::string, long>> launch_counts(bool blocks);  // tests/cuda_emu/emu.cpp
}
#endif

namespace py = pybind11;
using namespace fastlayers;

namespace {

enum Device : int { kCpu = 0, kCuda = 1 };

void raise_if_error(const Status& s) {
  switch (s.code) {
    case StatusCode::kSuccess:
      return;
    case StatusCode::kInvalidArgument:
      throw py::value_error(s.message);
    case StatusCode::kUnsupported:
      throw std::logic_error(std::string("fastlayers: unsupported: ") + s.message);
    default:
      throw std::runtime_error(std::string("fastlayers: CUDA error: ") + s.message);
  }
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

#ifdef FASTLAYERS_WITH_CUDA
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

template <typename Params>
void run(int device, const Params& p, std::uintptr_t stream, Status (*cpu)(const Params&),
         Status (*cuda)(const Params&, void*)) {
  Status s;
  {
    py::gil_scoped_release release;
    if (device == kCpu) {
      s = cpu(p);
    } else if (device == kCuda && kHasCuda) {
      s = cuda(p, ptr<void>(stream));
    } else {
      s = Status::invalid("fastlayers._C: this build has no kernels for that device");
    }
  }
  raise_if_error(s);
}

#ifdef FASTLAYERS_WITH_CUDA
#define FL_CUDA_OR_NONE(fn) fn
#else
template <typename Params>
Status no_cuda(const Params&, void*) {
  return Status::invalid("no CUDA");
}
#define FL_CUDA_OR_NONE(fn) no_cuda
#endif

void rms_norm_fwd(int device, std::uintptr_t x, int64_t x_row_stride, std::uintptr_t residual,
                  int64_t residual_row_stride, std::uintptr_t weight, std::uintptr_t y,
                  std::uintptr_t residual_out, std::uintptr_t y_scale, int64_t rows, int64_t cols,
                  int x_dtype, int weight_dtype, int y_dtype, float eps, float weight_offset,
                  bool round_once, bool fresh_output, std::uintptr_t stream) {
  rmsnorm::FwdParams p;
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.residual = ptr<const void>(residual);
  p.residual_row_stride = residual_row_stride;
  p.weight = ptr<const void>(weight);
  p.y = ptr<void>(y);
  p.residual_out = ptr<void>(residual_out);
  p.y_scale = ptr<float>(y_scale);
  p.rows = rows;
  p.cols = cols;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.weight_dtype = static_cast<DType>(weight_dtype);
  p.y_dtype = static_cast<DType>(y_dtype);
  p.eps = eps;
  p.weight_offset = weight_offset;
  p.round_once = round_once;
  p.fresh_output = fresh_output;
  run(device, p, stream, rmsnorm::forward_cpu, FL_CUDA_OR_NONE(rmsnorm::forward_cuda));
}

void rms_norm_bwd(int device, std::uintptr_t dy, std::uintptr_t x, int64_t x_row_stride,
                  std::uintptr_t weight, std::uintptr_t d_residual_out, std::uintptr_t dx,
                  std::uintptr_t dw, std::uintptr_t dw_partial, int64_t num_partials, int64_t rows,
                  int64_t cols, int x_dtype, int weight_dtype, float eps, float weight_offset,
                  bool round_once, std::uintptr_t stream) {
  rmsnorm::BwdParams p;
  p.dy = ptr<const void>(dy);
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.weight = ptr<const void>(weight);
  p.d_residual_out = ptr<const void>(d_residual_out);
  p.dx = ptr<void>(dx);
  p.dw = ptr<void>(dw);
  p.dw_partial = ptr<float>(dw_partial);
  p.num_partials = num_partials;
  p.rows = rows;
  p.cols = cols;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.weight_dtype = static_cast<DType>(weight_dtype);
  p.eps = eps;
  p.weight_offset = weight_offset;
  p.round_once = round_once;
  run(device, p, stream, rmsnorm::backward_cpu, FL_CUDA_OR_NONE(rmsnorm::backward_cuda));
}

void fff_ultra_fwd(int device, std::uintptr_t x, int64_t x_row_stride, std::uintptr_t w_in,
                   std::uintptr_t b_in, std::uintptr_t w_out, std::uintptr_t y, std::uintptr_t path,
                   std::uintptr_t preact, int64_t tokens, int64_t in_features, int64_t out_features,
                   int64_t levels, int dtype, int activation, std::uintptr_t stream) {
  fff::UltraFwdParams p;
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.w_in = ptr<const void>(w_in);
  p.b_in = ptr<const void>(b_in);
  p.w_out = ptr<const void>(w_out);
  p.y = ptr<void>(y);
  p.path = ptr<int32_t>(path);
  p.preact = ptr<float>(preact);
  p.tokens = tokens;
  p.in_features = in_features;
  p.out_features = out_features;
  p.levels = levels;
  p.dtype = static_cast<DType>(dtype);
  p.act = static_cast<fff::Activation>(activation);
  run(device, p, stream, fff::ultra_forward_cpu, FL_CUDA_OR_NONE(fff::ultra_forward_cuda));
}

void fff_ultra_bwd(int device, std::uintptr_t dy, std::uintptr_t x, int64_t x_row_stride,
                   std::uintptr_t w_in, std::uintptr_t w_out, std::uintptr_t path,
                   std::uintptr_t preact, std::uintptr_t order, std::uintptr_t offsets,
                   std::uintptr_t dx, std::uintptr_t dw_in, std::uintptr_t db_in,
                   std::uintptr_t dw_out, std::uintptr_t coef, int64_t tokens, int64_t in_features,
                   int64_t out_features, int64_t levels, int dtype, int activation,
                   std::uintptr_t stream) {
  fff::UltraBwdParams p;
  p.dy = ptr<const void>(dy);
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.w_in = ptr<const void>(w_in);
  p.w_out = ptr<const void>(w_out);
  p.path = ptr<const int32_t>(path);
  p.preact = ptr<const float>(preact);
  p.order = ptr<const int32_t>(order);
  p.offsets = ptr<const int64_t>(offsets);
  p.dx = ptr<void>(dx);
  p.dw_in = ptr<void>(dw_in);
  p.db_in = ptr<void>(db_in);
  p.dw_out = ptr<void>(dw_out);
  p.coef = ptr<float>(coef);
  p.tokens = tokens;
  p.in_features = in_features;
  p.out_features = out_features;
  p.levels = levels;
  p.dtype = static_cast<DType>(dtype);
  p.act = static_cast<fff::Activation>(activation);
  run(device, p, stream, fff::ultra_backward_cpu, FL_CUDA_OR_NONE(fff::ultra_backward_cuda));
}

void fff_hard_fwd(int device, std::uintptr_t x, int64_t x_row_stride, std::uintptr_t node_w,
                  std::uintptr_t node_b, std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w2,
                  std::uintptr_t b2, std::uintptr_t y, std::uintptr_t leaf, bool descent_only,
                  int64_t tokens,
                  int64_t in_features, int64_t out_features, int64_t width, int64_t depth,
                  int dtype, int activation, std::uintptr_t stream) {
  fff::HardFwdParams p;
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.node_w = ptr<const void>(node_w);
  p.node_b = ptr<const void>(node_b);
  p.w1 = ptr<const void>(w1);
  p.b1 = ptr<const void>(b1);
  p.w2 = ptr<const void>(w2);
  p.b2 = ptr<const void>(b2);
  p.y = ptr<void>(y);
  p.leaf = ptr<int32_t>(leaf);
  p.descent_only = descent_only;
  p.tokens = tokens;
  p.in_features = in_features;
  p.out_features = out_features;
  p.width = width;
  p.depth = depth;
  p.dtype = static_cast<DType>(dtype);
  p.act = static_cast<fff::Activation>(activation);
  run(device, p, stream, fff::hard_forward_cpu, FL_CUDA_OR_NONE(fff::hard_forward_cuda));
}

// Ops with CPU kernels only (the Python layer runs the reference on CUDA).
template <typename Params>
Status no_cuda_kernel(const Params&, void*) {
  return Status::invalid("no CUDA kernel for this op (the Python layer runs the reference)");
}

void peer_retrieve(int device, std::uintptr_t queries, std::uintptr_t keys_t, std::uintptr_t indices,
                   std::uintptr_t gates, int64_t tokens, int64_t heads, int64_t dim_key,
                   int64_t num_keys, int64_t keys_padded, int64_t topk, bool relu_gates, int dtype,
                   std::uintptr_t stream) {
  peer::RetrieveParams p;
  p.queries = ptr<const void>(queries);
  p.keys_t = ptr<const float>(keys_t);
  p.indices = ptr<int64_t>(indices);
  p.gates = ptr<void>(gates);
  p.tokens = tokens;
  p.heads = heads;
  p.dim_key = dim_key;
  p.num_keys = num_keys;
  p.keys_padded = keys_padded;
  p.topk = topk;
  p.relu_gates = relu_gates;
  p.dtype = static_cast<DType>(dtype);
  run(device, p, stream, peer::retrieve_cpu, FL_CUDA_OR_NONE(peer::retrieve_cuda));
}

void int4_fp8_gemm(int device, std::uintptr_t xq, int64_t x_row_stride, std::uintptr_t xs,
                   std::uintptr_t qweight, std::uintptr_t group_scale, std::uintptr_t channel_scale,
                   std::uintptr_t bias, int bias_dtype, std::uintptr_t y, int out_dtype, int64_t m,
                   int64_t n, int64_t k, int64_t group_size, std::uintptr_t stream) {
  int4_fp8::GemmParams p;
  p.xq = ptr<const fp8e4m3_t>(xq);
  p.x_row_stride = x_row_stride;
  p.xs = ptr<const float>(xs);
  p.qweight = ptr<const uint8_t>(qweight);
  p.group_scale = ptr<const fp8e4m3_t>(group_scale);
  p.channel_scale = ptr<const float>(channel_scale);
  p.bias = ptr<const void>(bias);
  p.bias_dtype = static_cast<DType>(bias_dtype);
  p.y = ptr<void>(y);
  p.out_dtype = static_cast<DType>(out_dtype);
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  run(device, p, stream, int4_fp8::gemm_cpu, FL_CUDA_OR_NONE(int4_fp8::gemm_cuda));
}

// Hopper CUTLASS GEMM (built with 90a): availability, supported shapes, prepack, workspace, GEMM.
#ifdef FASTLAYERS_WITH_SM90
constexpr bool kHasSm90Gemm = true;
#else
constexpr bool kHasSm90Gemm = false;
#endif

py::object int4_fp8_sm90_unsupported(int64_t n, int64_t k, int64_t group_size, int out_dtype) {
#ifdef FASTLAYERS_WITH_SM90
  const char* why = int4_fp8::sm90_unsupported_reason(n, k, group_size, static_cast<DType>(out_dtype));
  if (why == nullptr) return py::none();
  return py::str(why);
#else
  (void)n, (void)k, (void)group_size, (void)out_dtype;
  return py::str("this build has no Hopper (90a) CUTLASS kernels");
#endif
}

#ifdef FASTLAYERS_WITH_SM90
int4_fp8::Sm90GemmParams sm90_params(int device_index, std::uintptr_t xq, int64_t x_row_stride,
                                     std::uintptr_t xs, std::uintptr_t packed_weight,
                                     std::uintptr_t lut_scale, std::uintptr_t channel_scale,
                                     std::uintptr_t bias, std::uintptr_t y, int out_dtype, int64_t m,
                                     int64_t n, int64_t k, int64_t group_size,
                                     std::uintptr_t workspace, int64_t workspace_bytes) {
  int4_fp8::Sm90GemmParams p;
  p.device = device_index;
  p.xq = ptr<const fp8e4m3_t>(xq);
  p.x_row_stride = x_row_stride;
  p.xs = ptr<const float>(xs);
  p.packed_weight = ptr<const uint8_t>(packed_weight);
  p.lut_scale = ptr<const uint8_t>(lut_scale);
  p.channel_scale = ptr<const float>(channel_scale);
  p.bias = ptr<const float>(bias);
  p.y = ptr<void>(y);
  p.out_dtype = static_cast<DType>(out_dtype);
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.workspace = ptr<void>(workspace);
  p.workspace_bytes = workspace_bytes;
  return p;
}
#endif

void int4_fp8_prepack_sm90(int device, std::uintptr_t qweight, std::uintptr_t group_scale,
                           std::uintptr_t packed_weight, std::uintptr_t lut_scale, int64_t n,
                           int64_t k, int64_t group_size, std::uintptr_t stream) {
#ifdef FASTLAYERS_WITH_SM90
  int4_fp8::PrepackParams p;
  p.qweight = ptr<const uint8_t>(qweight);
  p.group_scale = ptr<const fp8e4m3_t>(group_scale);
  p.packed_weight = ptr<uint8_t>(packed_weight);
  p.lut_scale = ptr<uint8_t>(lut_scale);
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  run(device, p, stream, int4_fp8::prepack_sm90_host, int4_fp8::prepack_sm90_cuda);
#else
  (void)device, (void)qweight, (void)group_scale, (void)packed_weight, (void)lut_scale, (void)n;
  (void)k, (void)group_size, (void)stream;
  raise_if_error(Status::invalid("int4_fp8_prepack_sm90: this build has no Hopper kernels"));
#endif
}

int64_t int4_fp8_sm90_workspace(int device_index, int64_t m, int64_t n, int64_t k,
                                int64_t group_size, int out_dtype) {
#ifdef FASTLAYERS_WITH_SM90
  const auto p = sm90_params(device_index, 0, k, 0, 0, 0, 0, 0, 0, out_dtype, m, n, k, group_size, 0, 0);
  return int4_fp8::gemm_sm90_workspace(p);
#else
  (void)device_index, (void)m, (void)n, (void)k, (void)group_size, (void)out_dtype;
  return 0;
#endif
}

bool int4_fp8_sm90_can_implement(int64_t m, int64_t n, int64_t k, int64_t group_size, int out_dtype,
                                 int64_t x_row_stride, int sm_count) {
#ifdef FASTLAYERS_WITH_SM90
  // Stand-in, 256-byte aligned addresses: CUTLASS checks shapes, strides and alignment on the host
  // (with the split-K factor sm_count SMs would get).
  const std::uintptr_t a = 1 << 12;
  const auto p = sm90_params(0, a, x_row_stride, a, a, a, a, 0, a, out_dtype, m, n, k, group_size, 0, 0);
  return int4_fp8::gemm_sm90_can_implement(p, sm_count);
#else
  (void)m, (void)n, (void)k, (void)group_size, (void)out_dtype, (void)x_row_stride, (void)sm_count;
  return false;
#endif
}

// The split-K factor the Hopper GEMM uses for (m, n, k) on device_index (1 without the kernels).
int int4_fp8_sm90_splits(int device_index, int64_t m, int64_t n, int64_t k, int64_t group_size,
                         int out_dtype) {
#ifdef FASTLAYERS_WITH_SM90
  const auto p = sm90_params(device_index, 0, k, 0, 0, 0, 0, 0, 0, out_dtype, m, n, k, group_size, 0, 0);
  return int4_fp8::gemm_sm90_splits(p);
#else
  (void)device_index, (void)m, (void)n, (void)k, (void)group_size, (void)out_dtype;
  return 1;
#endif
}

std::string int4_fp8_sm90_config(int64_t m, int out_dtype) {
#ifdef FASTLAYERS_WITH_SM90
  return int4_fp8::gemm_sm90_config(m, static_cast<DType>(out_dtype));
#else
  (void)m, (void)out_dtype;
  return "";
#endif
}

void int4_fp8_gemm_sm90(int device_index, std::uintptr_t xq, int64_t x_row_stride,
                        std::uintptr_t xs, std::uintptr_t packed_weight, std::uintptr_t lut_scale,
                        std::uintptr_t channel_scale, std::uintptr_t bias, std::uintptr_t y,
                        int out_dtype, int64_t m, int64_t n, int64_t k, int64_t group_size,
                        std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t stream) {
#ifdef FASTLAYERS_WITH_SM90
  const auto p = sm90_params(device_index, xq, x_row_stride, xs, packed_weight, lut_scale,
                             channel_scale, bias, y, out_dtype, m, n, k, group_size, workspace,
                             workspace_bytes);
  const auto no_cpu = [](const int4_fp8::Sm90GemmParams&) {
    return Status::invalid("int4_fp8_gemm_sm90: CUDA only");
  };
  run(kCuda, p, stream, +no_cpu, int4_fp8::gemm_sm90_cuda);
#else
  (void)device_index, (void)xq, (void)x_row_stride, (void)xs, (void)packed_weight, (void)lut_scale;
  (void)channel_scale, (void)bias, (void)y, (void)out_dtype, (void)m, (void)n, (void)k;
  (void)group_size, (void)workspace, (void)workspace_bytes, (void)stream;
  raise_if_error(Status::invalid("int4_fp8_gemm_sm90: this build has no Hopper kernels"));
#endif
}

void quantize_fp8_per_token(int device, std::uintptr_t x, int64_t x_row_stride, std::uintptr_t xq,
                            std::uintptr_t xs, int64_t rows, int64_t cols, int dtype,
                            std::uintptr_t stream) {
  int4_fp8::QuantizeParams p;
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.xq = ptr<fp8e4m3_t>(xq);
  p.xs = ptr<float>(xs);
  p.rows = rows;
  p.cols = cols;
  p.dtype = static_cast<DType>(dtype);
  run(device, p, stream, int4_fp8::quantize_cpu, FL_CUDA_OR_NONE(int4_fp8::quantize_cuda));
}

// CUDA only: the CPU GEMM never needs a dequantised weight.
void int4_fp8_dequantize(std::uintptr_t qweight, std::uintptr_t group_scale, std::uintptr_t out,
                         int64_t n, int64_t k, int64_t group_size, std::uintptr_t stream) {
  int4_fp8::DequantParams p;
  p.qweight = ptr<const uint8_t>(qweight);
  p.group_scale = ptr<const fp8e4m3_t>(group_scale);
  p.out = ptr<fp8e4m3_t>(out);
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  const auto no_cpu = [](const int4_fp8::DequantParams&) {
    return Status::invalid("int4_fp8_dequantize: CUDA only");
  };
  run(kCuda, p, stream, +no_cpu, FL_CUDA_OR_NONE(int4_fp8::dequantize_cuda));
}

void varlen_attention(int device, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                      std::uintptr_t cu_seqlens_q, std::uintptr_t cu_seqlens_k, std::uintptr_t q_pos,
                      std::uintptr_t k_pos, std::uintptr_t out, std::uintptr_t lse, std::uintptr_t k_t,
                      int64_t nq, int64_t nk, int64_t batch, int64_t hq, int64_t hkv, int64_t d,
                      int64_t dv, int64_t window_left, int64_t window_right, double scale, int dtype,
                      std::uintptr_t stream, double softcap) {
  skip::VarlenParams p;
  p.softcap = static_cast<float>(softcap);
  p.q = ptr<const void>(q);
  p.k = ptr<const void>(k);
  p.v = ptr<const void>(v);
  p.cu_seqlens_q = ptr<const int32_t>(cu_seqlens_q);
  p.cu_seqlens_k = ptr<const int32_t>(cu_seqlens_k);
  p.q_pos = ptr<const int64_t>(q_pos);
  p.k_pos = ptr<const int64_t>(k_pos);
  p.out = ptr<void>(out);
  p.lse = ptr<float>(lse);
  p.k_t = ptr<float>(k_t);
  p.nq = nq;
  p.nk = nk;
  p.batch = batch;
  p.hq = hq;
  p.hkv = hkv;
  p.d = d;
  p.dv = dv;
  p.window_left = window_left;
  p.window_right = window_right;
  p.scale = static_cast<float>(scale);
  p.dtype = static_cast<DType>(dtype);
  run(device, p, stream, skip::varlen_attention_cpu, FL_CUDA_OR_NONE(skip::varlen_attention_cuda));
}

void varlen_attention_bwd(int device, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                          std::uintptr_t cu_seqlens_q, std::uintptr_t cu_seqlens_k,
                          std::uintptr_t q_pos, std::uintptr_t k_pos, std::uintptr_t out,
                          std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t dlse,
                          std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, int64_t nq,
                          int64_t nk, int64_t batch, int64_t hq, int64_t hkv, int64_t d,
                          int64_t d_v, int64_t window_left, int64_t window_right, double scale,
                          int dtype, std::uintptr_t delta, std::uintptr_t stream, double softcap) {
  skip::VarlenBwdParams p;
  p.fwd.softcap = static_cast<float>(softcap);
  p.delta = ptr<float>(delta);
  p.fwd.q = ptr<const void>(q);
  p.fwd.k = ptr<const void>(k);
  p.fwd.v = ptr<const void>(v);
  p.fwd.cu_seqlens_q = ptr<const int32_t>(cu_seqlens_q);
  p.fwd.cu_seqlens_k = ptr<const int32_t>(cu_seqlens_k);
  p.fwd.q_pos = ptr<const int64_t>(q_pos);
  p.fwd.k_pos = ptr<const int64_t>(k_pos);
  p.fwd.nq = nq;
  p.fwd.nk = nk;
  p.fwd.batch = batch;
  p.fwd.hq = hq;
  p.fwd.hkv = hkv;
  p.fwd.d = d;
  p.fwd.dv = d_v;
  p.fwd.window_left = window_left;
  p.fwd.window_right = window_right;
  p.fwd.scale = static_cast<float>(scale);
  p.fwd.dtype = static_cast<DType>(dtype);
  p.out = ptr<const void>(out);
  p.dout = ptr<const void>(dout);
  p.lse = ptr<const float>(lse);
  p.dlse = ptr<const float>(dlse);
  p.dq = ptr<void>(dq);
  p.dk = ptr<void>(dk);
  p.dv = ptr<void>(dv);
  run(device, p, stream, skip::varlen_attention_backward_cpu,
      FL_CUDA_OR_NONE(skip::varlen_attention_backward_cuda));
}

void int4_kv_decode(int device, std::uintptr_t q, std::uintptr_t k, std::uintptr_t k_scale,
                    std::uintptr_t v, std::uintptr_t v_scale, std::uintptr_t out, std::uintptr_t lse,
                    int64_t batch, int64_t hq, int64_t hkv, int64_t d, int64_t group, int64_t t_max,
                    int64_t length, double scale, std::uintptr_t workspace, std::uintptr_t stream,
                    int64_t q_tokens, std::uintptr_t q16, int q16_dtype, std::uintptr_t out16,
                    std::uintptr_t starts, double softcap, int64_t dv, int64_t v_row, int64_t v_scale_row,
                    int64_t splits, std::uintptr_t lengths, std::uintptr_t block_table, int64_t block_stride,
                    int64_t page_size, int64_t pages, std::uintptr_t q_lens, std::uintptr_t q_starts,
                    int64_t q_total) {
  kvint4::DecodeParams p;
  p.q_lens = ptr<const int32_t>(q_lens);
  p.q_starts = ptr<const int32_t>(q_starts);
  p.q_total = q_total;
  p.splits = splits;
  p.lengths = ptr<const int32_t>(lengths);
  p.block_table = ptr<const int32_t>(block_table);
  p.block_stride = block_stride;
  p.page_size = page_size;
  p.pages = pages;
  p.softcap = static_cast<float>(softcap);
  p.dv = dv;
  p.v_row = v_row;
  p.v_scale_row = v_scale_row;
  p.q_tokens = q_tokens;
  p.starts = ptr<const int32_t>(starts);
  p.q16 = ptr<const void>(q16);
  p.out16 = ptr<void>(out16);
  p.q16_dtype = static_cast<DType>(q16_dtype);
  p.workspace = ptr<float>(workspace);
  p.q = ptr<const float>(q);
  p.k = ptr<const uint8_t>(k);
  p.k_scale = ptr<const fp8e4m3_t>(k_scale);
  p.v = ptr<const uint8_t>(v);
  p.v_scale = ptr<const fp8e4m3_t>(v_scale);
  p.out = ptr<float>(out);
  p.lse = ptr<float>(lse);
  p.batch = batch;
  p.hq = hq;
  p.hkv = hkv;
  p.d = d;
  p.group = group;
  p.t_max = t_max;
  p.length = length;
  p.scale = static_cast<float>(scale);
  run(device, p, stream, kvint4::decode_cpu, FL_CUDA_OR_NONE(kvint4::decode_cuda));
}

void kv_quantize(int device, std::uintptr_t x, std::uintptr_t post_scale, std::uintptr_t packed,
                 std::uintptr_t scales, int64_t rows, int64_t d, int64_t group, int64_t tokens,
                 int64_t heads, int dtype, std::uintptr_t cos, std::uintptr_t sin,
                 int64_t cos_batch_stride, bool interleaved, std::uintptr_t stream, int64_t out_tokens,
                 int64_t out_start, std::uintptr_t q_out, bool q_fp8, std::uintptr_t slots, int64_t page_size,
                 int64_t num_slots) {
  kvint4::QuantizeParams p;
  p.x = ptr<const void>(x);
  p.post_scale = ptr<const float>(post_scale);
  p.cos = ptr<const float>(cos);
  p.sin = ptr<const float>(sin);
  p.cos_batch_stride = cos_batch_stride;
  p.interleaved = interleaved;
  p.packed = ptr<uint8_t>(packed);
  p.scales = ptr<fp8e4m3_t>(scales);
  p.rows = rows;
  p.d = d;
  p.group = group;
  p.tokens = tokens;
  p.heads = heads;
  p.dtype = static_cast<DType>(dtype);
  p.out_tokens = out_tokens;
  p.out_start = out_start;
  p.q_out = ptr<float>(q_out);
  p.q_fp8 = q_fp8;
  p.slots = ptr<const int64_t>(slots);
  p.page_size = page_size;
  p.num_slots = num_slots;
  run(device, p, stream, kvint4::quantize_cpu, FL_CUDA_OR_NONE(kvint4::quantize_cuda));
}

void peer_experts_fwd(int device, std::uintptr_t x, int64_t x_row_stride, std::uintptr_t indices,
                      std::uintptr_t gates, std::uintptr_t down, std::uintptr_t up, std::uintptr_t y,
                      std::uintptr_t preact, int64_t tokens, int64_t dim, int64_t pairs,
                      int64_t num_experts, int dtype, int activation, std::uintptr_t stream) {
  peer::ExpertsFwdParams p;
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.indices = ptr<const int64_t>(indices);
  p.gates = ptr<const void>(gates);
  p.down = ptr<const void>(down);
  p.up = ptr<const void>(up);
  p.y = ptr<void>(y);
  p.preact = ptr<float>(preact);
  p.tokens = tokens;
  p.dim = dim;
  p.pairs = pairs;
  p.num_experts = num_experts;
  p.dtype = static_cast<DType>(dtype);
  p.act = static_cast<fff::Activation>(activation);
  run(device, p, stream, peer::experts_forward_cpu, FL_CUDA_OR_NONE(peer::experts_forward_cuda));
}

void peer_experts_bwd(int device, std::uintptr_t dy, std::uintptr_t x, int64_t x_row_stride,
                      std::uintptr_t indices, std::uintptr_t gates, std::uintptr_t down,
                      std::uintptr_t up, std::uintptr_t preact, std::uintptr_t order,
                      std::uintptr_t seg_offsets, int64_t unique, std::uintptr_t ids, bool dense,
                      std::uintptr_t dx,
                      std::uintptr_t dgates, std::uintptr_t ddown_rows, std::uintptr_t dup_rows,
                      std::uintptr_t coef, int64_t tokens, int64_t dim, int64_t pairs,
                      int64_t num_experts, int dtype, int activation, std::uintptr_t stream) {
  peer::ExpertsBwdParams p;
  p.dy = ptr<const void>(dy);
  p.x = ptr<const void>(x);
  p.x_row_stride = x_row_stride;
  p.indices = ptr<const int64_t>(indices);
  p.gates = ptr<const void>(gates);
  p.down = ptr<const void>(down);
  p.up = ptr<const void>(up);
  p.preact = ptr<const float>(preact);
  p.order = ptr<const int32_t>(order);
  p.seg_offsets = ptr<const int64_t>(seg_offsets);
  p.unique = unique;
  p.ids = ptr<const int64_t>(ids);
  p.dense = dense;
  p.dx = ptr<void>(dx);
  p.dgates = ptr<void>(dgates);
  p.ddown_rows = ptr<void>(ddown_rows);
  p.dup_rows = ptr<void>(dup_rows);
  p.coef = ptr<float>(coef);
  p.tokens = tokens;
  p.dim = dim;
  p.pairs = pairs;
  p.num_experts = num_experts;
  p.dtype = static_cast<DType>(dtype);
  p.act = static_cast<fff::Activation>(activation);
  run(device, p, stream, peer::experts_backward_cpu, FL_CUDA_OR_NONE(peer::experts_backward_cuda));
}

bool peer_experts_cuda_supported(int64_t tokens, int64_t dim, int64_t pairs) {
#ifdef FASTLAYERS_WITH_CUDA
  return peer::experts_cuda_supported(tokens, dim, pairs);
#else
  (void)tokens, (void)dim, (void)pairs;
  return false;
#endif
}

bool varlen_attention_cuda_supported(int64_t d, int64_t dv, int64_t nq, int64_t hq) {
#ifdef FASTLAYERS_WITH_CUDA
  return skip::varlen_attention_cuda_supported(d, dv, nq, hq);
#else
  (void)d, (void)dv, (void)nq, (void)hq;
  return false;
#endif
}

void rows_op(int op, int device, std::uintptr_t x, std::uintptr_t idx, std::uintptr_t rows,
             std::uintptr_t gate, std::uintptr_t y, std::uintptr_t d_gate, int64_t n, int64_t m,
             int64_t dim, int dtype, std::uintptr_t stream) {
  skip::RowsParams p;
  p.x = ptr<const void>(x);
  p.idx = ptr<const int64_t>(idx);
  p.rows = ptr<const void>(rows);
  p.gate = ptr<const float>(gate);
  p.y = ptr<void>(y);
  p.d_gate = ptr<float>(d_gate);
  p.n = n;
  p.m = m;
  p.dim = dim;
  p.dtype = static_cast<DType>(dtype);
  switch (op) {
    case 0:
      run(device, p, stream, skip::gather_rows_cpu, FL_CUDA_OR_NONE(skip::gather_rows_cuda));
      break;
    case 1:
      run(device, p, stream, skip::scatter_add_gated_cpu, FL_CUDA_OR_NONE(skip::scatter_add_gated_cuda));
      break;
    case 2:
      run(device, p, stream, skip::scatter_add_gated_backward_cpu,
          FL_CUDA_OR_NONE(skip::scatter_add_gated_backward_cuda));
      break;
    default:
      throw py::value_error("rows_op: op must be 0 (gather), 1 (scatter) or 2 (scatter backward)");
  }
}

// Floats of CUDA workspace int4_kv_decode needs for values of dv channels (0: d) in `splits` splits
// (0: the length's), 0 when the CUDA kernel does not take the shape or this build has no CUDA.
int64_t int4_kv_decode_cuda_workspace(int64_t batch, int64_t hq, int64_t hkv, int64_t d, int64_t length,
                                      int64_t dv, int64_t splits) {
#ifdef FASTLAYERS_WITH_CUDA
  if (!kvint4::decode_cuda_supported(hq, hkv, d, dv, batch)) return 0;
  return kvint4::decode_cuda_workspace_floats(batch, hq, dv > 0 ? dv : d, length, splits);
#else
  (void)batch, (void)hq, (void)hkv, (void)d, (void)length, (void)dv, (void)splits;
  return 0;
#endif
}

bool peer_retrieve_cuda_supported(int64_t tokens, int64_t heads, int64_t dim_key, int64_t num_keys,
                                  int64_t keys_padded, int64_t topk) {
#ifdef FASTLAYERS_WITH_CUDA
  return peer::retrieve_cuda_supported(tokens, heads, dim_key, num_keys, keys_padded, topk);
#else
  (void)tokens, (void)heads, (void)dim_key, (void)num_keys, (void)keys_padded, (void)topk;
  return false;
#endif
}

// Asks the kernel to back [addr, addr + nbytes) with transparent huge pages before anything touches
// it (what torch's THP_MEM_ALLOC_ENABLE does for every allocation). For fresh gradient tables of
// hundreds of MiB, first-touch page faults on 4 KiB pages cost more than writing the data; 2 MiB
// pages cut that about 4x. Only the 2 MiB-aligned interior is advised; a no-op off Linux and when
// THP is disabled. Returns whether the advice was taken.
bool advise_hugepages(std::uintptr_t addr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  const std::uintptr_t begin = (addr + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (addr + static_cast<std::uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (nbytes <= 0 || end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)addr;
  (void)nbytes;
  return false;
#endif
}

void set_cpu_isa(const std::string& name) {
  for (cpu::Isa isa : cpu::kIsas) {
    if (name == cpu::isa_name(isa)) {
      if (!cpu::set_active_isa(isa)) {
        throw py::value_error("set_cpu_isa: this CPU does not support '" + name + "'");
      }
      return;
    }
  }
  std::string names;
  for (cpu::Isa isa : cpu::kIsas) names += std::string(names.empty() ? "'" : ", '") + cpu::isa_name(isa) + "'";
  throw py::value_error("set_cpu_isa: isa must be one of " + names + ", got '" + name + "'");
}

// Every CPU kernel level this build knows, lowest first (each runs the kernels of the levels below).
py::tuple cpu_isa_names() {
  py::list names;
  for (cpu::Isa isa : cpu::kIsas) names.append(py::str(cpu::isa_name(isa)));
  return py::tuple(names);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlayers compiled kernels (private: use fastlayers.* instead)";
  m.def("version", [] { return std::string(FASTLAYERS_VERSION); });
#ifdef FASTLAYERS_CUDA_EMULATION
  constexpr bool kCudaEmulated = true;
#else
  constexpr bool kCudaEmulated = false;
#endif
  m.def("has_cuda", [] { return kHasCuda && !kCudaEmulated; });
  m.def("cuda_emulated", [] { return kCudaEmulated; },
        "True in a test build whose CUDA kernels run on the CPU (tests/cuda_emu; never a release "
        "build): device code 1 then reaches them with host pointers");
#ifdef FASTLAYERS_CUDA_EMULATION
  m.def(
      "cuda_emu_selftest",
      [](int which, std::uintptr_t out) {
        return std::string(cuda_emu_selftest::run(which, ptr<float>(out)));
      },
      "Emulation builds only: runs self-test kernel `which` into out (64 floats); the launch's "
      "error string or 'ok'");
  m.def(
      "cuda_emu_launches",
      [](bool blocks) {
        py::dict d;
        for (const auto& [site, n] : emu::launch_counts(blocks)) d[py::str(site)] = n;
        return d;
      },
      py::arg("blocks") = false,
      "Emulation builds only: {'file:line kernel': launches} of every launch site run so far (with "
      "blocks=True: their blocks, every launch's grid together)");
#endif
  m.def("cuda_archs", [] { return std::string(FASTLAYERS_CUDA_ARCHS); },
        "Comma-separated CUDA architectures the kernels were compiled for ('' without CUDA)");
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  m.def("detected_cpu_isa", [] { return std::string(cpu::isa_name(cpu::detected_isa())); });
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"));
  m.def("cpu_isa_names", &cpu_isa_names, "Every CPU kernel level of this build, lowest first");
  m.def("avx512_emulated", &cpu::avx512_emulated,
        "True in a test build whose AVX-512 kernels run through SIMDe (never a release build)");
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("fff_ultra_fwd", &fff_ultra_fwd);
  m.def("fff_ultra_bwd", &fff_ultra_bwd);
  m.def("fff_hard_fwd", &fff_hard_fwd);
  m.def("peer_retrieve", &peer_retrieve);
  m.def("peer_retrieve_key_tile", [] { return peer::kRetrieveKeyTile; });
  m.def("peer_experts_fwd", &peer_experts_fwd);
  m.def("peer_experts_bwd", &peer_experts_bwd);
  m.def("peer_experts_cuda_supported", &peer_experts_cuda_supported);
  m.def("peer_retrieve_cuda_supported", &peer_retrieve_cuda_supported);
  m.def("int4_kv_decode_cuda_workspace", &int4_kv_decode_cuda_workspace);
  m.def("rows_op", &rows_op);
  m.def("varlen_attention_cuda_supported", &varlen_attention_cuda_supported);
  m.def("int4_fp8_gemm", &int4_fp8_gemm);
  m.def("quantize_fp8_per_token", &quantize_fp8_per_token);
  m.def("int4_fp8_dequantize", &int4_fp8_dequantize);
  m.def("has_sm90_gemm", [] { return kHasSm90Gemm; });
  m.def("int4_fp8_sm90_unsupported", &int4_fp8_sm90_unsupported);
  m.def("int4_fp8_prepack_sm90", &int4_fp8_prepack_sm90);
  m.def("int4_fp8_sm90_workspace", &int4_fp8_sm90_workspace);
  m.def("int4_fp8_sm90_config", &int4_fp8_sm90_config);
  m.def("int4_fp8_sm90_can_implement", &int4_fp8_sm90_can_implement, py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("out_dtype"), py::arg("x_row_stride"),
        py::arg("sm_count") = 1);
  m.def("int4_fp8_sm90_splits", &int4_fp8_sm90_splits);
  m.def("int4_fp8_sm90_split_k", &int4_fp8::sm90_split_k, py::arg("tiles"), py::arg("k_tiles"),
        py::arg("sm_count"));
  m.def("int4_fp8_gemm_sm90", &int4_fp8_gemm_sm90);
  m.def("varlen_cpu_workspace_floats", &skip::varlen_cpu_workspace_floats);
  m.def("varlen_attention", &varlen_attention);
  m.def("varlen_attention_bwd", &varlen_attention_bwd);
  m.def("int4_kv_decode", &int4_kv_decode);
  m.def("kv_quantize", &kv_quantize);
  m.def("advise_hugepages", &advise_hugepages, py::arg("addr"), py::arg("nbytes"));
}
