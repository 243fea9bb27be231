// SPDX-License-Identifier: Apache-2.0
// The sm80 warp-level instructions the tensor-core attention uses, one inline-PTX function each:
//   ldmatrix (x4, plain and transposed): four 8x8 tiles of 16-bit values from shared memory into the
//     mma fragment layout; lane l gives the address of row l % 8 of tile l / 8.
//   mma.sync m16n8k16 (fp16 or bf16 inputs, fp32 accumulation): d += a b on a 16x16 A (row-major
//     fragments) and a 16x8 B (column-major fragments).
//   cp.async (16 bytes, zero-filled when the source is cut off), commit / wait of its groups.
//   prmt (byte permute), unpack2 (a register's two 16-bit values as fp32) and i4x2_f16x2 (two
//   INT4 values to fp16 times their scales, exact), for kernels that build fragments in registers.
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"): with g = lane / 4 and t = lane % 4,
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B: b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C, D: c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// a 32-bit register holding two 16-bit values, the lower column (or k) in its low half.
// Test builds with FASTLAYERS_CUDA_EMULATION take the same functions from tests/cuda_emu (run on the
// CPU, fragment for fragment).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#ifdef FASTLAYERS_CUDA_EMULATION
#include "emu_ptx.h"
#else

namespace fastlayers::cuda::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// r[i]: tile i (rows from lanes 8i..8i+7), lane l holding row l / 4, columns 2 (l % 4) and + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// The same tiles transposed: lane l holds column l / 4, rows 2 (l % 4) and + 1.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two fp32 values rounded to the 16-bit type (round to nearest even), lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The two 16-bit values of a register as fp32 (lo: the low half).
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t r, float& lo, float& hi);

template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t r, float& lo, float& hi) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r));
  lo = f.x;
  hi = f.y;
}

// Byte k of the result is byte (sel >> 4k) & 7 of the pair (a: bytes 0-3, b: bytes 4-7).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) { return __byte_perm(a, b, sel); }

// u: two 4-bit values in offset binary (INT4 n as n + 8) in bits 0-3 and 16-19, all other bits 0;
// s: two fp16 scales. Returns the fp16 pair ((u - 8) * s): 0x6400 | u is the fp16 1024 + u, so
// one subtraction of 1032 and one product, both exact (a 4-bit integer times an FP8 scale fits
// fp16's 11 bits).
__device__ __forceinline__ uint32_t i4x2_f16x2(uint32_t u, uint32_t s) {
  uint32_t r;
  asm("{\n"
      "  sub.rn.f16x2 %0, %1, %2;\n"
      "  mul.rn.f16x2 %0, %0, %3;\n"
      "}\n"
      : "=r"(r)
      : "r"(u | 0x64006400u), "r"(0x64086408u), "r"(s));
  return r;
}

// 16 bytes global -> shared, asynchronously; bytes past `src_bytes` (0 or 16) are zero-filled (the
// source is not read then, but must still be a valid address expression).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `Pending` of this thread's committed groups are still in flight. (The
// "memory" clobbers keep the compiler from moving shared-memory accesses across the copies.)
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

}  // namespace fastlayers::cuda::ptx

#endif  // FASTLAYERS_CUDA_EMULATION
