// SPDX-License-Identifier: Apache-2.0
// The CPU emulation's runtime (see emu.h): the fiber scheduler, barriers, warp collectives and the
// few CUDA runtime API functions the launchers call.
#include "emu.h"

#include <cuda_runtime_api.h>
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// Fiber switches: on x86-64 a few instructions (callee-saved registers and the stack pointer; no
// signal mask: swapcontext's system call per switch took half the emulation's time), elsewhere
// ucontext.
#if defined(__x86_64__)
extern "C" void fastlayers_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl fastlayers_emu_switch
.hidden fastlayers_emu_switch
.type fastlayers_emu_switch, @function
fastlayers_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fastlayers_emu_switch, .-fastlayers_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
#else
using Context = ucontext_t;
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kOptinSmem = 232448;  // H100: 227 KiB per block

// The shared memory a block may opt in to: kOptinSmem, or FASTLAYERS_CUDA_EMU_OPTIN_SMEM bytes
// (e.g. 101376, sm86 / sm89's 99 KiB: the kernels' fallbacks for GPUs with less).
size_t optin_smem() {
  static const size_t bytes = [] {
    const char* env = std::getenv("FASTLAYERS_CUDA_EMU_OPTIN_SMEM");
    return env != nullptr && *env != '\0' ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : kOptinSmem;
  }();
  return bytes;
}
constexpr int kSmCount = 132;

struct Fiber {
  Context ctx;
  void* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
  bool done = false;
};

// A warp's or a block's barrier: complete when every thread not exited has arrived.
struct Barrier {
  int live = 0;   // threads not exited
  int count = 0;  // arrivals at the current barrier
  unsigned gen = 0;
  const char* file = nullptr;  // the block barrier's call site this generation (the first arrival's)
  int line = 0;

  bool arrive() {  // true: this arrival completed it
    if (++count < live) return false;
    release();
    return true;
  }
  void leave() {  // a thread exits
    --live;
    if (count > 0 && count == live) release();
  }
  void release() {
    count = 0;
    ++gen;
    file = nullptr;
  }
};

struct Warp {
  Barrier bar;
  unsigned live_mask = 0;
  alignas(16) unsigned char slot[32][16];
};

struct Block {
  std::vector<Fiber>* fibers = nullptr;
  int threads = 0;
  Barrier bar;
  int or_acc[2] = {0, 0};
  std::vector<Warp> warps;
  int current = 0;
  unsigned long progress = 0;
  const char* failure = nullptr;
  Context sched;
  void* sched_fake_stack = nullptr;
  const void* sched_bottom = nullptr;  // the scheduler's stack, for ASan's switch annotations
  size_t sched_size = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  unsigned char* smem = nullptr;
  uint3 block_idx;
};

thread_local Block* g_block = nullptr;
thread_local std::vector<Fiber> g_fibers;  // stacks kept between launches
thread_local unsigned long g_epoch = 0;     // blocks run so far (static shared memory's poison)
thread_local std::map<const void*, unsigned long> g_launches;  // launches per kernel (block order)
thread_local std::map<void*, unsigned long> g_shared_epoch;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local char g_message[512];
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
thread_local const char* g_site = "";

// The launch sites run, with their launch and block counts (launch_counts); printed at exit with
// FASTLAYERS_EMU_TRACE=1.
struct Trace {
  bool on = std::getenv("FASTLAYERS_EMU_TRACE") != nullptr;
  std::map<std::string, std::pair<long, long>> sites;
  ~Trace() {
    if (!on) return;
    std::fprintf(stderr, "CUDA emulation: %zu launch sites run (launches, blocks):\n", sites.size());
    for (const auto& [site, n] : sites) std::fprintf(stderr, "  %8ld %10ld  %s\n", n.first, n.second, site.c_str());
  }
};
Trace g_trace;
std::mutex g_trace_mutex;

void set_error(cudaError_t e, const char* message) {
  if (g_last_error == cudaSuccess) {
    g_last_error = e;
    std::snprintf(g_message, sizeof(g_message), "CUDA emulation: %s (%s)", message, g_site);
  }
}

inline void asan_start_switch(void** fake, const void* bottom, size_t size) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

inline void asan_finish_switch(void* fake, const void** bottom, size_t* size) {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

Fiber& me() { return (*g_block->fibers)[g_block->current]; }

inline void switch_to(Context* save, Context* load) {
#if defined(__x86_64__)
  fastlayers_emu_switch(&save->sp, load->sp);
#else
  swapcontext(save, load);
#endif
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Block& b = *g_block;
  Fiber& f = me();
  asan_start_switch(&f.fake_stack, b.sched_bottom, b.sched_size);
  switch_to(&f.ctx, &b.sched);
  asan_finish_switch(f.fake_stack, &b.sched_bottom, &b.sched_size);
}

int tid() { return g_block->current; }

void check_mask(const Warp& w, unsigned mask, const char* what) {
  const unsigned exists = w.live_mask;
  if ((mask & exists) != mask || (exists & ~mask) != 0) {
    static thread_local char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%s with mask 0x%08x in a warp whose taking-part lanes are 0x%08x (block %u,%u,%u "
                  "thread %d): undefined on a GPU",
                  what, mask, exists, blockIdx.x, blockIdx.y, blockIdx.z, tid());
    fail(buf);
  }
}

void wait(Barrier& bar) {
  Block& b = *g_block;
  ++b.progress;
  const unsigned gen = bar.gen;
  if (bar.arrive()) return;
  while (bar.gen == gen && b.failure == nullptr) yield();
}

Warp& my_warp() { return g_block->warps[tid() / 32]; }

void on_exit(int t) {
  Block& b = *g_block;
  ++b.progress;
  Warp& w = b.warps[t / 32];
  w.live_mask &= ~(1u << (t % 32));
  w.bar.leave();
  b.bar.leave();
}

void fiber_main() {
  Block& b = *g_block;
  asan_finish_switch(nullptr, &b.sched_bottom, &b.sched_size);
  const int t = b.current;
  b.body(b.ctx);
  on_exit(t);
  Fiber& f = (*b.fibers)[t];
  f.done = true;
  asan_start_switch(nullptr, b.sched_bottom, b.sched_size);  // this fiber ends
  switch_to(&f.ctx, &b.sched);                                // and is never resumed
  std::abort();
}

// A fresh fiber whose first switch enters fiber_main on its own stack.
void start_fiber(Fiber& f, Block& b) {
#if defined(__x86_64__)
  (void)b;
  auto* top = reinterpret_cast<void**>(static_cast<char*>(f.stack) + kStackBytes);  // 16-aligned
  top[-1] = nullptr;                                                 // (fiber_main never returns)
  top[-2] = reinterpret_cast<void*>(&fiber_main);                    // fastlayers_emu_switch's ret
  for (int i = 3; i <= 8; ++i) top[-i] = nullptr;                    // rbp rbx r12 r13 r14 r15
  f.ctx.sp = top - 8;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &b.sched;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

void set_coords(const Block& b, int t) {
  threadIdx.x = static_cast<unsigned>(t) % blockDim.x;
  threadIdx.y = (static_cast<unsigned>(t) / blockDim.x) % blockDim.y;
  threadIdx.z = static_cast<unsigned>(t) / (blockDim.x * blockDim.y);
  blockIdx = b.block_idx;
}

bool run_block(Block& b) {
  ++g_epoch;
  for (Warp& w : b.warps) w = Warp{};
  for (int t = 0; t < b.threads; ++t) {
    Warp& w = b.warps[t / 32];
    ++w.bar.live;
    w.live_mask |= 1u << (t % 32);
  }
  b.bar = Barrier{b.threads, 0, 0};
  b.or_acc[0] = b.or_acc[1] = 0;
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = (*b.fibers)[t];
    f.done = false;
    start_fiber(f, b);
  }
  // Between block barriers the warps run one after another, each until all of its lanes wait at a
  // block barrier (or have exited): its warp collectives complete among its own lanes, so that a
  // warp never sees another warp's shared-memory writes of the same barrier interval. Every other
  // block runs its warps, and each warp its lanes, last to first: a read of shared memory that
  // another thread writes with no barrier between sees it unwritten in one of the two orders, even
  // with warp collectives between the write and the read.
  const bool reverse = (g_epoch & 1) != 0;
  const int warps = static_cast<int>(b.warps.size());
  while (b.bar.live > 0) {
    const unsigned long before = b.progress;
    for (int nw = 0; nw < warps && b.failure == nullptr; ++nw) {
      const int w = reverse ? warps - 1 - nw : nw;
      const int t0 = 32 * w, lanes = std::min(32, b.threads - t0);
      unsigned long pass;
      do {  // passes over the warp's lanes while any of them gets on
        pass = b.progress;
        for (int n = 0; n < lanes && b.failure == nullptr; ++n) {
          const int t = t0 + (reverse ? lanes - 1 - n : n);
          Fiber& f = (*b.fibers)[t];
          if (f.done) continue;
          b.current = t;
          set_coords(b, t);
          asan_start_switch(&b.sched_fake_stack, f.stack, kStackBytes);
          switch_to(&b.sched, &f.ctx);
          asan_finish_switch(b.sched_fake_stack, nullptr, nullptr);
        }
      } while (b.progress != pass && b.failure == nullptr);
    }
    if (b.failure != nullptr) return false;
    if (b.bar.live > 0 && b.progress == before) {
      static thread_local char buf[160];
      std::snprintf(buf, sizeof(buf),
                    "deadlock in block (%u,%u,%u): %d threads wait at barriers that the others "
                    "never reach",
                    b.block_idx.x, b.block_idx.y, b.block_idx.z, b.bar.live);
      b.failure = buf;
      return false;
    }
  }
  return true;
}

}  // namespace

void run_grid(const void* kernel, const char* site, dim3 grid, dim3 block, size_t smem,
              void (*body)(void*), void* ctx) {
  g_site = site;
  {  // (counted always: launch_counts)
    std::lock_guard<std::mutex> lock(g_trace_mutex);
    auto& n = g_trace.sites[site];
    n.first += 1;
    n.second += static_cast<long>(grid.x) * grid.y * grid.z;
  }
  if (g_block != nullptr) {
    set_error(cudaErrorNotSupported, "a launch from inside a kernel");
    return;
  }
#if defined(__x86_64__) && defined(__FMA__)
  // (compiled with FMA contraction, as nvcc compiles: CMakeLists.txt)
  static const bool has_fma = __builtin_cpu_supports("fma");
  if (!has_fma) {
    set_error(cudaErrorNotSupported, "the CUDA emulation build needs a CPU with FMA instructions");
    return;
  }
#endif
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  size_t allowed = kDefaultSmem;
  auto it = g_max_dynamic_smem.find(kernel);
  if (it != g_max_dynamic_smem.end()) allowed = std::max(allowed, static_cast<size_t>(it->second));
  if (smem > allowed) {
    set_error(cudaErrorInvalidValue,
              "dynamic shared memory above 48 KiB without the "
              "cudaFuncAttributeMaxDynamicSharedMemorySize opt-in (or above it)");
    return;
  }
  if (g_fibers.size() < threads) {
    const size_t old = g_fibers.size();
    g_fibers.resize(threads);
    for (size_t i = old; i < threads; ++i) {
      void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (s == MAP_FAILED) std::abort();
      g_fibers[i].stack = s;
    }
  }
  Block b;
  b.fibers = &g_fibers;
  b.threads = static_cast<int>(threads);
  b.warps.resize((threads + 31) / 32);
  b.body = body;
  b.ctx = ctx;
  std::vector<unsigned char> smem_buf(smem > 0 ? smem : 1);  // exactly smem bytes: ASan sees overruns
  b.smem = smem > 0 ? smem_buf.data() : nullptr;
  blockDim = block;
  gridDim = grid;
  g_block = &b;
  // Every other launch of a kernel runs its blocks last to first: a block that reads what another
  // block of the same launch writes (no order between blocks on a GPU) sees it unwritten in one of
  // the two.
  const bool reverse = (g_launches[kernel]++ & 1) != 0;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  for (unsigned long long n = 0; n < blocks; ++n) {
    const unsigned long long i = reverse ? blocks - 1 - n : n;
    b.block_idx = uint3{static_cast<unsigned>(i % grid.x),
                        static_cast<unsigned>(i / grid.x % grid.y),
                        static_cast<unsigned>(i / grid.x / grid.y)};
    if (smem > 0) std::memset(b.smem, 0xFF, smem);
    if (!run_block(b)) {
      g_block = nullptr;
      set_error(cudaErrorLaunchFailure, b.failure);
      return;
    }
  }
  g_block = nullptr;
}

std::vector<std::pair<std::string, long>> launch_counts(bool blocks) {
  std::lock_guard<std::mutex> lock(g_trace_mutex);
  std::vector<std::pair<std::string, long>> out;
  for (const auto& [site, n] : g_trace.sites) out.emplace_back(site, blocks ? n.second : n.first);
  return out;
}

// A block barrier reached from source line `file`:`line`. The threads of one barrier generation
// must all come from one line: __syncthreads in code that the block's threads do not all run alike
// is undefined on a GPU (it may hang, or pair unrelated barriers), so it fails the launch here.
// (Source lines, not code addresses: a call the compiler duplicates is still one site; a barrier in
// a helper function is the helper's line for every caller.)
void syncthreads(const char* file, int line) {
  Block& b = *g_block;
  if (b.bar.file == nullptr) {
    b.bar.file = file;
    b.bar.line = line;
  } else if (b.bar.line != line || std::strcmp(b.bar.file, file) != 0) {
    static thread_local char buf[400];
    std::snprintf(buf, sizeof(buf),
                  "threads of block (%u,%u,%u) wait at different __syncthreads() call sites, %s:%d "
                  "and %s:%d (thread %d): divergent barriers are undefined on a GPU",
                  blockIdx.x, blockIdx.y, blockIdx.z, b.bar.file, b.bar.line, file, line, tid());
    fail(buf);
  }
  wait(b.bar);
}

int syncthreads_or(int predicate, const char* file, int line) {
  Block& b = *g_block;
  const int slot = static_cast<int>(b.bar.gen & 1u);
  b.or_acc[slot] |= predicate != 0;
  syncthreads(file, line);
  const int r = b.or_acc[slot];
  syncthreads(file, line);
  if (tid() == 0) b.or_acc[slot] = 0;  // no thread reuses this slot before thread 0 is past here
  return r;
}

void syncwarp(unsigned mask) {
  Warp& w = my_warp();
  check_mask(w, mask, "__syncwarp");
  wait(w.bar);
}

void warp_exchange(unsigned mask, const void* value, size_t n, int src, void* out) {
  Warp& w = my_warp();
  check_mask(w, mask, "a warp shuffle");
  std::memcpy(w.slot[tid() % 32], value, n);
  wait(w.bar);
  if (src >= 0 && src < 32 && ((w.live_mask >> src) & 1u)) {
    std::memcpy(out, w.slot[src], n);
  } else {
    std::memset(out, 0xFF, n);
  }
  wait(w.bar);
}

unsigned warp_ballot(unsigned mask, int predicate) {
  Warp& w = my_warp();
  check_mask(w, mask, "a warp vote");
  const int p = predicate != 0;
  std::memcpy(w.slot[tid() % 32], &p, sizeof(p));
  wait(w.bar);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) {
    int q = 0;
    if ((w.live_mask >> l) & 1u) std::memcpy(&q, w.slot[l], sizeof(q));
    if (q) r |= 1u << l;
  }
  wait(w.bar);
  return r;
}

void warp_gather(unsigned mask, const void* value, size_t n, void* out) {
  Warp& w = my_warp();
  check_mask(w, mask, "a warp-wide instruction");
  if (n > sizeof(w.slot[0])) fail("warp_gather: at most 16 bytes per lane");
  std::memcpy(w.slot[tid() % 32], value, n);
  wait(w.bar);
  auto* dst = static_cast<unsigned char*>(out);
  for (int l = 0; l < 32; ++l) {
    if ((w.live_mask >> l) & 1u) {
      std::memcpy(dst + l * n, w.slot[l], n);
    } else {
      std::memset(dst + l * n, 0xFF, n);
    }
  }
  wait(w.bar);
}

int lane() { return tid() % 32; }

int thread_index() { return tid(); }

unsigned long block_epoch() { return g_epoch; }

unsigned char* dynamic_smem() { return g_block->smem; }

void shared_array(void* p, size_t bytes) {
  unsigned long& e = g_shared_epoch[p];
  if (e != g_epoch) {
    e = g_epoch;
    std::memset(p, 0xFF, bytes);
  }
}

void launch_bounds(long max_threads) {
  if (static_cast<long>(blockDim.x) * blockDim.y * blockDim.z > max_threads) {
    fail("launched with more threads per block than its __launch_bounds__");
  }
}

void fail(const char* message) {
  Block& b = *g_block;
  b.failure = message;
  for (;;) yield();  // the scheduler abandons this fiber's stack
}

}  // namespace emu

// --- the runtime API the launchers call -----------------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : emu::g_message;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(emu::optin_smem());
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = emu::kSmCount;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = emu::kMaxThreads;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > emu::optin_smem()) {
    emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: more shared memory than the device has");
    return cudaErrorInvalidValue;
  }
  emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}

}  // extern "C"
