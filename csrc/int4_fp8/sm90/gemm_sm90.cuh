// SPDX-License-Identifier: Apache-2.0
// Hopper (sm90a) INT4 x FP8 GEMM: CUTLASS 4.2's mixed-input warp-specialized mainloop in look-up-table
// mode (INT4 weights turned into FP8 through a per-group table of the 8 values fp8(-8s) .. fp8(-s),
// the positive half derived in registers), FP8 tensor cores, fp32 accumulation.
//
// The operands are swapped explicitly: CUTLASS's "A" is the weight [N, K] (narrow, register-sourced,
// K-major, in the reordered layout prepack() writes) and "B" the activations [M, K] (K-major), so the
// GEMM computes D^T[N, M], stored column-major = Y[M, N] row-major, and the TMA epilogue still works
// (CUTLASS's implicit swap would rule it out). The epilogue is an EVT:
//   Y[m, n] = out( xs[m] * (c[n] * acc[n, m]) + bias[n] )
// with c (channel scale) and bias broadcast along GEMM rows and xs (token scale) along GEMM columns.
//
// One instantiation per generated file (gemm_sm90_inst.cu.in): Config<Out, TokTile, Cluster>.
// Compiled only for 90a, with -DNDEBUG (without it ptxas serialises the wgmma pipeline, C7510) and
// ptxas warnings as errors (the build fails on C7510 / C7515 instead of shipping a slow kernel).
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "common/status.h"
#include "int4_fp8/int4_fp8.h"
#include "int4_fp8/sm90/layout_sm90.cuh"

namespace fastlayers::int4_fp8::sm90 {

using namespace cute;

// Tile shapes: the weight tile (GEMM M) is 128 rows, the token tile (GEMM N) follows the batch, and
// the K tile is 128 FP8 values (one group of 128 per K tile: the collective needs g % 128 == 0).
template <class Out, int kTokTile, int kClusterM>
struct Config {
  using ElementOut = Out;
  using TileShape = Shape<_128, Int<kTokTile>, _128>;
  using ClusterShape = Shape<Int<kClusterM>, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;  // 32 INT4 values
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<Mma>::value;    // 16 FP8 values
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<Out>::value;

  // Epilogue tree: fma(xs[m], c[n] * acc, bias[n]); c and bias are GEMM-row (weight) vectors, xs a
  // GEMM-column (token) vector. A null bias reads as 0.
  static constexpr auto RoundStyle = cutlass::FloatRoundStyle::round_to_nearest;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using ChannelScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                                   Stride<_1, _0, int64_t>>;
  using TokenScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                                 Stride<_0, _1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                           Stride<_1, _0, int64_t>>;
  using ScaleAcc = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, RoundStyle>,
      ChannelScale, Acc>;
  using Evt = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float,
                                             RoundStyle>,
      TokenScale, ScaleAcc, Bias>;

  // D^T [N, M] column-major; no C operand.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlignOut,
      Out, cutlass::layout::ColumnMajor, kAlignOut,
      EpilogueSchedule, Evt>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Quant, cutlass::Array<Mma, 8>>, LayoutW, kAlignW,
      Mma, cutlass::layout::ColumnMajor, kAlignX,  // X^T [K, M] column-major = X [M, K] row-major
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  // The stream-K scheduler, used for data-parallel tiles or a plain split-K (sm90_split_k): its
  // reduction of the splits' partial sums runs before the epilogue, so the EVT sees whole sums.
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The split-K factor of configuration C for p on sm_count SMs.
template <class C>
int split_k(const Sm90GemmParams& p, int sm_count) {
  constexpr int64_t kWeightTile = size<0>(typename C::TileShape{});
  constexpr int64_t kTokTile = size<1>(typename C::TileShape{});
  constexpr int64_t kKTile = size<2>(typename C::TileShape{});
  const int64_t tiles = ((p.n + kWeightTile - 1) / kWeightTile) * ((p.m + kTokTile - 1) / kTokTile);
  return sm90_split_k_enabled() ? sm90_split_k(tiles, (p.k + kKTile - 1) / kKTile, sm_count) : 1;
}

// Builds CUTLASS's arguments for p (swapped problem N x M x K). Host only, no CUDA calls.
template <class C>
typename C::Gemm::Arguments make_arguments(const Sm90GemmParams& p, int sm_count) {
  using Gemm = typename C::Gemm;
  using StrideX = typename C::Kernel::StrideB;
  using StrideD = typename C::Kernel::StrideD;
  using StrideS = typename C::CollectiveMainloop::StrideScale;
  const int n = static_cast<int>(p.n), m = static_cast<int>(p.m), k = static_cast<int>(p.k);
  const int scale_k = static_cast<int>((p.k + p.group_size - 1) / p.group_size);

  StrideX stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(m, k, 1));
  get<0>(stride_x) = p.x_row_stride;  // (token, k, batch): rows of xq may be padded
  const StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(n, m, 1));
  const StrideS stride_s = cutlass::make_cute_packed_stride(StrideS{}, make_shape(n, scale_k, 1));

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {n, m, k, 1},
      {reinterpret_cast<const Quant*>(p.packed_weight), weight_layout(n, k),
       reinterpret_cast<const Mma*>(p.xq), stride_x,
       reinterpret_cast<const cutlass::Array<Mma, 8>*>(p.lut_scale), stride_s,
       static_cast<int>(p.group_size)},
      {{},  // fusion arguments, filled below
       nullptr, stride_d,
       reinterpret_cast<typename C::ElementOut*>(p.y), stride_d}};
  // Tree order: {token scale, {channel scale, acc, multiplies}, bias, fma}; a null bias reads as 0.
  args.epilogue.thread = {{p.xs}, {{p.channel_scale}, {}, {}}, {p.bias}, {}};
  args.hw_info.device_id = p.device;
  args.hw_info.sm_count = sm_count;
  // Split K when the output tiles leave SMs idle (decode); else one CTA per tile, persistent.
  using Scheduler = typename C::Kernel::TileScheduler;
  const int splits = split_k<C>(p, sm_count);
  args.scheduler.splits = splits;
  args.scheduler.decomposition_mode = splits > 1 ? Scheduler::DecompositionMode::SplitK
                                                 : Scheduler::DecompositionMode::DataParallel;
  args.scheduler.reduction_mode = Scheduler::ReductionMode::Deterministic;
  return args;
}

// Runs one configuration. workspace: p.workspace_bytes (>= workspace_size<C>(p)) or null when 0.
template <class C>
Status run(const Sm90GemmParams& p, int sm_count, cudaStream_t stream) {
  typename C::Gemm gemm;
  auto args = make_arguments<C>(p, sm_count);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    return Status::unsupported("int4_fp8_gemm_sm90: CUTLASS cannot implement this shape");
  }
  if (C::Gemm::get_workspace_size(args) > static_cast<size_t>(p.workspace_bytes)) {
    return Status::invalid("int4_fp8_gemm_sm90: workspace too small");
  }
  if (gemm.initialize(args, p.workspace, stream) != cutlass::Status::kSuccess) {
    return {StatusCode::kCudaError, "int4_fp8_gemm_sm90: CUTLASS initialize failed"};
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    return {StatusCode::kCudaError, "int4_fp8_gemm_sm90: CUTLASS launch failed"};
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status::ok() : Status{StatusCode::kCudaError, cudaGetErrorString(e)};
}

// CUTLASS's own host-side check of the arguments for sm_count SMs (no CUDA call: runs without a GPU).
template <class C>
bool can_implement(const Sm90GemmParams& p, int sm_count) {
  return C::Gemm::can_implement(make_arguments<C>(p, sm_count)) == cutlass::Status::kSuccess;
}

template <class C>
size_t workspace_size(const Sm90GemmParams& p, int sm_count) {
  return C::Gemm::get_workspace_size(make_arguments<C>(p, sm_count));
}

}  // namespace fastlayers::int4_fp8::sm90
