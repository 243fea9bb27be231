// SPDX-License-Identifier: Apache-2.0
// CPU PEER expert kernels, compiled once per ISA into fastlayers::cpu::<isa>::peer. OpenMP over
// tokens (each owns its output row) and over selected experts (each owns its gradient rows). The
// expert rows a token needs are known before it starts (unlike a tree descent), so the rows of the
// pairs kPrefetchAhead ahead are prefetched while the current pair is computed.
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include "common/rows_cpu.h"
#include "common/simd_cpu.h"
#include "fff/activation.h"
#include "peer/peer.h"

namespace fastlayers::cpu::FL_CPU_ISA::peer {

using fastlayers::fff::act_grad;
using fastlayers::fff::act_value;
using fastlayers::peer::ExpertsBwdParams;
using fastlayers::peer::ExpertsFwdParams;

namespace {

constexpr const char* kDtypeError = "peer: dtype must be float32, float16 or bfloat16";
constexpr int64_t kPrefetchAhead = 2;
constexpr int64_t kParallelMinWork = 1 << 16;

// A sum of many scaled rows, accumulated in blocks of kBlock terms (sum of block sums): the rounding
// error grows with kBlock + terms / kBlock instead of with the number of terms (512 pairs per token
// or thousands of tokens per popular expert are common).
constexpr int kBlock = 32;

struct BlockedRowSum {
  float* total;
  float* block;
  int64_t n;
  int count = 0;

  explicit BlockedRowSum(int64_t n_) : total(new float[2 * n_]), block(total + n_), n(n_) {}
  ~BlockedRowSum() { delete[] total; }
  BlockedRowSum(const BlockedRowSum&) = delete;
  BlockedRowSum& operator=(const BlockedRowSum&) = delete;

  void reset() {
    for (int64_t j = 0; j < 2 * n; ++j) total[j] = 0.0f;
    count = 0;
  }
  template <typename T>
  void add(float s, const T* row) {
    axpy(s, row, block, n);
    if (++count == kBlock) flush();
  }
  void flush() {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      vstore(total + i, vadd(vload(total + i), vload(block + i)));
      vstore(block + i, vzero());
    }
    for (; i < n; ++i) {
      total[i] += block[i];
      block[i] = 0.0f;
    }
    count = 0;
  }
  // Rounds the sum once into out.
  template <typename T>
  void store(T* out) {
    flush();
    int64_t i = 0;
    for (; i + kW <= n; i += kW) vstore(out + i, vload(total + i));
    for (; i < n; ++i) store_as(out + i, total[i]);
  }
  // The same, through the L1-resident staging row, with streaming stores into out.
  template <typename T>
  void store_streaming(T* out, T* staging) {
    store(staging);
    stream_bytes(reinterpret_cast<char*>(out), reinterpret_cast<const char*>(staging),
                 n * static_cast<int64_t>(sizeof(T)));
  }
};

template <typename T>
void forward_typed(const ExpertsFwdParams& p) {
  const int64_t dim = p.dim, P = p.pairs;
  const T* x = static_cast<const T*>(p.x);
  const T* gates = static_cast<const T*>(p.gates);
  const T* down = static_cast<const T*>(p.down);
  const T* up = static_cast<const T*>(p.up);
  const bool parallel = p.tokens * P * dim >= kParallelMinWork;
#pragma omp parallel if (parallel && p.tokens > 1)
  {
    BlockedRowSum acc(dim);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      const T* xt = x + t * p.x_row_stride;
      const int64_t* idx = p.indices + t * P;
      acc.reset();
      for (int64_t q = 0; q < kPrefetchAhead && q < P; ++q) {
        prefetch_row(down + idx[q] * dim, dim);
        prefetch_row(up + idx[q] * dim, dim);
      }
      for (int64_t q = 0; q < P; ++q) {
        if (q + kPrefetchAhead < P) {
          prefetch_row(down + idx[q + kPrefetchAhead] * dim, dim);
          prefetch_row(up + idx[q + kPrefetchAhead] * dim, dim);
        }
        const float s = dot(xt, down + idx[q] * dim, dim);
        p.preact[t * P + q] = s;
        acc.add(to_float(gates[t * P + q]) * act_value(p.act, s), up + idx[q] * dim);
      }
      acc.store(static_cast<T*>(p.y) + t * dim);
    }
  }
}

template <typename T>
void backward_typed(const ExpertsBwdParams& p) {
  const int64_t dim = p.dim, P = p.pairs;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* gates = static_cast<const T*>(p.gates);
  const T* down = static_cast<const T*>(p.down);
  const T* up = static_cast<const T*>(p.up);
  const bool parallel = p.tokens * P * dim >= kParallelMinWork;
#pragma omp parallel if (parallel)
  {
    BlockedRowSum acc(dim);
    // 1. Per token: c = dy . up[e]; dgate = act(s) c; coef = act'(s) gate c; dx = sum coef down[e].
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      const T* dyt = dy + t * dim;
      const int64_t* idx = p.indices + t * P;
      acc.reset();
      for (int64_t q = 0; q < P; ++q) {
        if (q + kPrefetchAhead < P) {
          prefetch_row(down + idx[q + kPrefetchAhead] * dim, dim);
          prefetch_row(up + idx[q + kPrefetchAhead] * dim, dim);
        }
        const float c = dot(dyt, up + idx[q] * dim, dim);
        const float s = p.preact[t * P + q], g = to_float(gates[t * P + q]);
        store_as(static_cast<T*>(p.dgates) + t * P + q, act_value(p.act, s) * c);
        const float coef = act_grad(p.act, s) * g * c;
        p.coef[t * P + q] = coef;
        acc.add(coef, down + idx[q] * dim);
      }
      acc.store(static_cast<T*>(p.dx) + t * dim);
    }
    // (implicit barrier: phase 2 reads every token's coef)
    // 2. Per selected expert, its pairs in token order: compact row u, or (dense) table row ids[u]
    //    after zeroing the unselected rows since the previous selected one; u == unique zeroes the
    //    tail. Every table row is written once, so a fresh (unfaulted) table needs no memset first.
    T* ddown = static_cast<T*>(p.ddown_rows);
    T* dup = static_cast<T*>(p.dup_rows);
    T* staging = new T[dim];
    const int64_t segments = p.unique + (p.dense ? 1 : 0);
#pragma omp for schedule(dynamic, 64) nowait
    for (int64_t u = 0; u < segments; ++u) {
      int64_t row = u;
      if (p.dense) {
        const int64_t gap_begin = u == 0 ? 0 : p.ids[u - 1] + 1;
        row = u == p.unique ? p.num_experts : p.ids[u];
        const int64_t gap_bytes = (row - gap_begin) * dim * static_cast<int64_t>(sizeof(T));
        stream_bytes(reinterpret_cast<char*>(ddown + gap_begin * dim), nullptr, gap_bytes);
        stream_bytes(reinterpret_cast<char*>(dup + gap_begin * dim), nullptr, gap_bytes);
        if (u == p.unique) continue;
      }
      const int64_t begin = p.seg_offsets[u], end = p.seg_offsets[u + 1];
      acc.reset();
      for (int64_t k = begin; k < end; ++k) {
        const int64_t pair = p.order[k];
        acc.add(p.coef[pair], x + (pair / P) * p.x_row_stride);
      }
      acc.store_streaming(ddown + row * dim, staging);
      acc.reset();
      for (int64_t k = begin; k < end; ++k) {
        const int64_t pair = p.order[k];
        acc.add(act_value(p.act, p.preact[pair]) * to_float(gates[pair]), dy + (pair / P) * dim);
      }
      acc.store_streaming(dup + row * dim, staging);
    }
    stream_fence();  // the streaming stores, before the region's closing barrier
    delete[] staging;
  }
}

}  // namespace

Status experts_forward(const ExpertsFwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(forward_typed, p, kDtypeError) }
Status experts_backward(const ExpertsBwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(backward_typed, p, kDtypeError) }


}  // namespace fastlayers::cpu::FL_CPU_ISA::peer
