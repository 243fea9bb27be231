// SPDX-License-Identifier: Apache-2.0
// The weight layout the Hopper LUT GEMM reads (prepack() writes it; gemm_sm90.cuh passes the same
// layout object to CUTLASS), shared by host and device code.
//
// The mainloop feeds the INT4 weight to wgmma from registers, so the 16 values one thread holds in a
// wgmma A fragment (m64 x k32 per warpgroup; per warp 16 rows x 32 k) are stored contiguously and
// arrive as one 64-bit load. The atom is derived from CuTe's register-sourced FP8 wgmma A layout:
// invert one warp's (thread, value) -> (row, k) map and give each thread's values consecutive
// offsets. It comes out as (row, k) -> 64 (row % 8) + 4 (row / 8) + (k % 4) + 16 ((k / 4) % 4) +
// 8 (k / 16) on a 16 x 32 block; blocks are tiled row-fastest. tests/test_int4_fp8_sm90.py checks
// this closed form against the kernels' (host) prepack.
#pragma once

#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/float8.h"
#include "cutlass/integer_subbyte.h"

namespace fastlayers::int4_fp8::sm90 {

using Mma = cutlass::float_e4m3_t;
using Quant = cutlass::int4b_t;

template <class T>
CUTE_HOST_DEVICE constexpr auto reordering_atom() {
  using namespace cute;
  using Traits = MMA_Traits<decltype(SM90::GMMA::rs_op_selector<T, T, float, Shape<_64, _16, _32>>())>;
  auto tv = typename Traits::ALayout{};  // (thread of 128, value) -> (row, k) in the 64 x 32 A tile
  // One warp: the first 32 threads; its rows are a quarter of the warpgroup's.
  auto warp_tv = make_layout_like(composition(tv, make_shape(Int<32>{}, size<1>(tv))));
  auto warp_rk = shape_div(select<0, 2>(typename Traits::Shape_MNK{}), Int<4>{});
  auto rk_to_tv = right_inverse(warp_tv).with_shape(warp_rk);  // (row, k) -> thread + 32 * value
  // (thread, value) -> value + thread * values: each thread's values adjacent in memory.
  auto tv_to_offset = make_layout(make_shape(Int<32>{}, size<1>(tv)), make_stride(size<1>(tv), Int<1>{}));
  return composition(tv_to_offset, rk_to_tv);
}

using LayoutAtomW = decltype(reordering_atom<Mma>());
using StrideW = cute::Stride<int64_t, cute::_1, int64_t>;  // [N, K] K-major, batch mode unused
using LayoutW = decltype(cute::tile_to_shape(LayoutAtomW{},
                                             cute::Layout<cute::Shape<int, int, int>, StrideW>{}));

static_assert(cute::size(LayoutAtomW{}) == 512, "one warp's 16 x 32 FP8 A fragment");

// The reordered layout of an [n, k] weight (n % 16 == 0, k % 32 == 0): coordinate -> INT4 element.
CUTE_HOST_DEVICE LayoutW weight_layout(int n, int k) {
  return cute::tile_to_shape(LayoutAtomW{}, cute::make_shape(n, k, 1));
}

// CUTLASS's LUT encoding of a two's-complement INT4 value: 1..7 become 8 - v (so that the low three
// bits index the table of fp8(-8s) .. fp8(-s), the sign bit choosing the negated half); 0 and
// negative values are unchanged.
CUTE_HOST_DEVICE constexpr uint32_t lut_encode_nibble(uint32_t nib) {
  return (nib == 0 || (nib & 8u)) ? nib : 8u - nib;
}

}  // namespace fastlayers::int4_fp8::sm90
