// SPDX-License-Identifier: Apache-2.0
// A CPU emulation of the CUDA execution model, for test builds only (FASTLAYERS_CUDA_EMULATION):
// the generic .cu files compile as host C++ and their kernels run on the CPU, so that the tests
// can check their logic against the reference where no GPU is lent, under AddressSanitizer in CI
// (the role compute-sanitizer's memcheck plays on a GPU). It proves nothing about speed. Of the
// GPU's numerics, a * b + c is contracted into fused multiply-adds as nvcc does by default (on
// x86-64; GCC picks its own candidates), but the math functions are the CPU's (no 2-ulp expf or
// rsqrtf): a result here is "the index arithmetic, the barriers and the algorithm are right", not
// "it ran on a GPU".
//
// Model: a launch runs its blocks one after another; a block's threads are fibers (own stacks) on
// the calling thread, switched at every barrier: __syncthreads(), __syncwarp() and each warp
// collective (shuffles, votes, WMMA loads). A waiting fiber yields until the barrier completes;
// a round in which no fiber makes progress is a deadlock and fails the launch. Exited threads
// leave every barrier they would have joined. Misuse the hardware leaves undefined fails the
// launch with a message (cudaGetLastError): a full-mask warp collective in a warp with exited or
// missing lanes, threads of a block at __syncthreads() calls on different source lines (divergent
// barriers), a block over 1024 threads, dynamic shared memory above 48 KiB without the
// cudaFuncAttributeMaxDynamicSharedMemorySize opt-in or above the 227 KiB an H100 allows.
// Shared memory (static and dynamic) is poisoned with 0xFF bytes (NaN as floats) at each block's
// start; a shuffle from a lane that does not take part returns poison. Between block barriers the
// warps run one at a time (a warp's collectives complete among its own lanes), and every other
// block runs its warps and lanes in reverse order, so that a missing barrier shows in one of the
// two, warp collectives between the write and the read or not;
// every other launch of a kernel runs its blocks in reverse order, so that a block reading
// another's output of the same launch shows too.
// A launch above a kernel's __launch_bounds__ fails.
#pragma once

#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __launch_bounds__(...)

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace emu {

// Runs body(ctx) in every thread of a grid; returns after the last block (launches are
// synchronous). Errors go to cudaGetLastError().
// `site`: "file:line kernel" of the launch (error messages, FASTLAYERS_EMU_TRACE=1).
void run_grid(const void* kernel, const char* site, dim3 grid, dim3 block, size_t smem,
              void (*body)(void*), void* ctx);

// Every launch site run so far ("file:line kernel", as `site` above) and its launch count, or
// with blocks its blocks (all launches' grids together).
std::vector<std::pair<std::string, long>> launch_counts(bool blocks = false);

void syncthreads(const char* file, int line);
int syncthreads_or(int predicate, const char* file, int line);
void syncwarp(unsigned mask);
// Warp collective: publishes n bytes of `value`, returns lane `src`'s into `out` (poison when
// that lane does not take part).
void warp_exchange(unsigned mask, const void* value, size_t n, int src, void* out);
// Warp collective: every taking part lane's predicate, as a ballot.
unsigned warp_ballot(unsigned mask, int predicate);
// Warp collective: every lane's n bytes (n <= 16) of `value`, lane l's at out + l * n (poison for a
// lane that does not take part). The emulated warp-wide instructions (emu_ptx.h) build on it.
void warp_gather(unsigned mask, const void* value, size_t n, void* out);
int lane();
// The calling thread's index in its block, and how many blocks have started so far in this OS
// thread (tells one block's leftover state from the next one's).
int thread_index();
unsigned long block_epoch();
unsigned char* dynamic_smem();
// Poisons a static __shared__ array when the first thread of a block reaches its declaration.
void shared_array(void* p, size_t bytes);
[[noreturn]] void fail(const char* message);
// A kernel's __launch_bounds__: more threads per block fail the launch, as on a GPU.
void launch_bounds(long max_threads);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* site;
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... a) const {
    // The parameters are converted once, as a launch copies them; each thread gets its own copy.
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    run_grid(
        reinterpret_cast<const void*>(kernel), site, grid, block, smem,
        [](void* c) {
          auto* x = static_cast<Ctx*>(c);
          std::apply(x->kernel, x->args);
        },
        &ctx);
  }
};

// kernel<<<grid, block, smem, stream>>>(args) becomes emu::launch(kernel, "file:line kernel",
// grid, block, smem, stream)(args) (translate.py).
template <typename... P, typename Stream = std::nullptr_t>
Launch<P...> launch(void (*kernel)(P...), const char* site, dim3 grid, dim3 block, size_t smem = 0,
                    Stream = nullptr) {
  return Launch<P...>{kernel, site, grid, block, smem};
}

}  // namespace emu

// --- device intrinsics --------------------------------------------------------------------------

// (macros: a block barrier knows its source line, and the threads of one barrier must share it)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(predicate) ::emu::syncthreads_or((predicate), __FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }

namespace emu {
// CUDA's shuffles take scalars of at most 8 bytes (int, float, double, half2, ...): a larger
// type does not compile here either (rather than be cut to the exchange slot's 16 bytes).
template <typename T>
constexpr void check_shuffle_type() {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "a warp shuffle moves a scalar of at most 8 bytes, as CUDA's do");
}
}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  emu::check_shuffle_type<T>();
  const int l = emu::lane();
  T r;
  emu::warp_exchange(mask, &v, sizeof(T), (l & ~(width - 1)) + (src & (width - 1)), &r);
  return r;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  emu::check_shuffle_type<T>();
  const int l = emu::lane();
  const int src = l ^ lane_mask;
  T r;
  emu::warp_exchange(mask, &v, sizeof(T), (src & ~(width - 1)) == (l & ~(width - 1)) ? src : l, &r);
  return r;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  emu::check_shuffle_type<T>();
  const int l = emu::lane();
  const int src = (l & (width - 1)) + static_cast<int>(delta) < width ? l + static_cast<int>(delta) : l;
  T r;
  emu::warp_exchange(mask, &v, sizeof(T), src, &r);
  return r;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) { return emu::warp_ballot(mask, predicate); }
inline int __any_sync(unsigned mask, int predicate) { return emu::warp_ballot(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return emu::warp_ballot(mask, predicate) == emu::warp_ballot(mask, 1);
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

namespace emu {
// What CUDA's _rn intrinsics promise: never merged into a fused multiply-add (the emulation
// compiles with contraction on, as nvcc does): the value passes through memory the compiler
// cannot see into.
inline float opaque(float a) {
  volatile float v = a;
  return v;
}
}  // namespace emu
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return emu::opaque(a * b); }
inline float __fadd_rn(float a, float b) { return emu::opaque(a) + emu::opaque(b); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __float_as_int(float a) {
  int r;
  std::memcpy(&r, &a, 4);
  return r;
}
inline float __int_as_float(int a) {
  float r;
  std::memcpy(&r, &a, 4);
  return r;
}
using std::max;
using std::min;
