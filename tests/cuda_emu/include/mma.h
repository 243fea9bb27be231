// SPDX-License-Identifier: Apache-2.0
// Test builds only: WMMA (nvcuda::wmma) for the CPU emulation (emu.h). A and B fragments hold the
// whole tile in every lane; an accumulator holds the lane's own 8 of the 256 elements (element
// lane + 32 m, m < 8, row-major), as many as a GPU thread's. The loads are warp collectives (the
// lanes meet first, as the hardware's _sync operations converge); a store writes the lane's own
// elements: a lane that reads back what the warp stored without a __syncwarp() between sees the
// others' part unwritten, as it may on a GPU. Products are accumulated in fp32, k in order.
#pragma once

#include "emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr bool kAcc = std::is_same_v<Use, accumulator>;
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kAcc ? rows * cols / 32 : rows * cols;
  T x[num_elements];  // A, B: row-major [rows][cols]; accumulator: elements lane + 32 m
};

namespace detail {
inline float to_f(float v) { return v; }
template <typename T>
float to_f(T v) {
  return static_cast<float>(v);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  __syncwarp();
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
    }
  }
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  __syncwarp();
  for (int m = 0, e = emu::lane(); m < M * N / 32; ++m, e += 32) {
    const int r = e / N, c = e % N;
    f.x[m] = l == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  __syncwarp();
  for (int m = 0, e = emu::lane(); m < M * N / 32; ++m, e += 32) {
    const int r = e / N, c = e % N;
    (l == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[m];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T v) {
  for (auto& e : f.x) e = v;
}

// The lane's own elements of d = a b + c.
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  for (int m = 0, e = emu::lane(); m < M * N / 32; ++m, e += 32) {
    const int i = e / N, j = e % N;
    float s = c.x[m];
    for (int k = 0; k < K; ++k) s += detail::to_f(a.x[i * K + k]) * detail::to_f(b.x[k * N + j]);
    d.x[m] = s;
  }
}

}  // namespace nvcuda::wmma
