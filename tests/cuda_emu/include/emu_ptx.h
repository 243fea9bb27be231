// SPDX-License-Identifier: Apache-2.0
// Test builds only: csrc/common/ptx.cuh's warp-level instructions on the CPU emulation (emu.h), with
// the fragment layouts of the PTX ISA, so that a kernel that puts a value in the wrong lane or the
// wrong half of a register gets wrong results here as on a GPU.
//   ldmatrix: the lanes' row addresses are gathered (a warp collective, as the instruction is) and
//     each lane reads its own two 16-bit values; a row address not 16-byte aligned fails the launch.
//   mma_16816: the lanes' A and B registers are gathered; each lane computes its own four
//     accumulators in fp32, k in order (the hardware's internal rounding is not modelled).
//   cp.async: the source is read when the copy is issued, the destination written only when a
//     cp_async_wait retires its group, so that a kernel that reads the destination before waiting
//     (or before the barrier after the wait, through the emulation's thread order) reads poison.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <deque>
#include <vector>

#include "emu.h"

namespace fastlayers::cuda::ptx {
namespace emu_detail {

template <typename T>
float half_of(uint32_t r, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? r >> 16 : r & 0xFFFFu);
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

inline void gather_rows(const void* row, const unsigned char* (&rows)[32]) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) emu::fail("ldmatrix: a row address is not 16-byte aligned");
  emu::warp_gather(0xFFFFFFFFu, &row, sizeof(row), rows);
}

struct Copy {
  void* dst;
  std::array<unsigned char, 16> bytes;
};

struct AsyncState {
  unsigned long epoch = ~0ul;
  std::vector<Copy> open;                  // issued, not yet committed
  std::deque<std::vector<Copy>> groups;    // committed, oldest first
};

// This thread's copies (a block's threads are fibers of one OS thread: one state per thread index;
// the state of a block that ended with copies in flight is dropped when the next block starts).
inline AsyncState& async_state() {
  thread_local std::vector<AsyncState> states(1024);
  AsyncState& s = states[emu::thread_index()];
  if (s.epoch != emu::block_epoch()) s = AsyncState{emu::block_epoch(), {}, {}};
  return s;
}

}  // namespace emu_detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned char* rows[32];
  emu_detail::gather_rows(row, rows);
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], rows[8 * i + l / 4] + 4 * (l % 4), 4);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned char* rows[32];
  emu_detail::gather_rows(row, rows);
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    std::memcpy(&lo, rows[8 * i + 2 * (l % 4)] + 2 * (l / 4), 2);
    std::memcpy(&hi, rows[8 * i + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
}

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t A[32][4], B[32][2];
  emu::warp_gather(0xFFFFFFFFu, a, sizeof(a), A);
  emu::warp_gather(0xFFFFFFFFu, b, sizeof(b), B);
  // A(i, k): lane 4 (i % 8) + (k % 8) / 2, register (i >= 8) + 2 (k >= 8), half k % 2;
  // B(k, j): lane 4 j + (k % 8) / 2, register (k >= 8), half k % 2.
  const auto a_at = [&](int i, int k) {
    return emu_detail::half_of<T>(A[4 * (i % 8) + (k % 8) / 2][(i >= 8) + 2 * (k >= 8)], k % 2);
  };
  const auto b_at = [&](int k, int j) { return emu_detail::half_of<T>(B[4 * j + (k % 8) / 2][k >= 8], k % 2); };
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int i = g + 8 * (e / 2), j = 2 * t + e % 2;
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += a_at(i, k) * b_at(k, j);
    d[e] = s;
  }
}

template <typename T>
uint32_t pack2(float lo, float hi) {
  const T l(lo), h(hi);  // round to nearest even
  uint16_t lb, hb;
  std::memcpy(&lb, &l, 2);
  std::memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | static_cast<uint32_t>(hb) << 16;
}

template <typename T>
void unpack2(uint32_t r, float& lo, float& hi) {
  lo = emu_detail::half_of<T>(r, 0);
  hi = emu_detail::half_of<T>(r, 1);
}

inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t bytes = static_cast<uint64_t>(b) << 32 | a;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>((bytes >> (8 * ((sel >> (4 * k)) & 7))) & 0xFFu) << (8 * k);
  return r;
}

// (each half: (u - 8) * s, computed in fp32 and rounded to fp16: exact, as on the GPU)
inline uint32_t i4x2_f16x2(uint32_t u, uint32_t s) {
  if (u & 0xFFF0FFF0u) emu::fail("i4x2_f16x2: bits set outside the two 4-bit values");
  return pack2<__half>(static_cast<float>(static_cast<int>(u & 15u) - 8) * emu_detail::half_of<__half>(s, 0),
                       static_cast<float>(static_cast<int>((u >> 16) & 15u) - 8) * emu_detail::half_of<__half>(s, 1));
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    emu::fail("cp.async: a 16-byte copy with an address not 16-byte aligned");
  }
  emu_detail::Copy c{dst, {}};
  if (src_bytes > 0) std::memcpy(c.bytes.data(), src, static_cast<size_t>(src_bytes));
  emu_detail::async_state().open.push_back(c);
}

inline void cp_async_commit() {
  auto& s = emu_detail::async_state();
  s.groups.push_back(std::move(s.open));
  s.open.clear();
}

template <int Pending>
void cp_async_wait() {
  auto& s = emu_detail::async_state();
  while (s.groups.size() > static_cast<size_t>(Pending)) {
    for (const auto& c : s.groups.front()) std::memcpy(c.dst, c.bytes.data(), 16);
    s.groups.pop_front();
  }
}

}  // namespace fastlayers::cuda::ptx
