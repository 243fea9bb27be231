// SPDX-License-Identifier: Apache-2.0
// CPU FFF kernels, compiled once per ISA (cmake/CpuIsa.cmake) into fastlayers::cpu::<isa>::fff.
// OpenMP over tokens; no atomics (each token owns its output row, each node its gradient rows).
// The descent interleaves kGroup tokens per level: each level's dot product depends on the last
// level's decision, so one token alone leaves the core waiting on a dependent row load; several
// independent tokens keep loads in flight. The next level's w_in row is prefetched as soon as the
// decision is known.
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include "common/rows_cpu.h"
#include "common/simd_cpu.h"
#include "fff/activation.h"
#include "fff/fff.h"

#include <omp.h>

namespace fastlayers::cpu::FL_CPU_ISA::fff {

using fastlayers::fff::act_grad;
using fastlayers::fff::act_value;
using fastlayers::fff::HardFwdParams;
using fastlayers::fff::UltraBwdParams;
using fastlayers::fff::UltraFwdParams;

namespace {

constexpr const char* kDtypeError = "fff: dtype must be float32, float16 or bfloat16";
constexpr int kGroup = 4;
constexpr int kMaxLevels = 31;
// Below this many multiply-adds the OpenMP fork/join (a few microseconds) costs more than it saves.
constexpr int64_t kParallelMinWork = 1 << 16;

// out[j] = sum over l < levels of coef[l] * rows[l][j], summed in level order, rounded once.
// Four column blocks at a time: four independent FMA chains instead of one latency-bound chain.
template <typename T>
void combine_rows(const float* coef, const T* const* rows, int64_t levels, T* out, int64_t n) {
  int64_t j = 0;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (int64_t l = 0; l < levels; ++l) {
      const V c = vset1(coef[l]);
      const T* r = rows[l] + j;
      a0 = vfma(c, vload(r), a0);
      a1 = vfma(c, vload(r + kW), a1);
      a2 = vfma(c, vload(r + 2 * kW), a2);
      a3 = vfma(c, vload(r + 3 * kW), a3);
    }
    vstore(out + j, a0);
    vstore(out + j + kW, a1);
    vstore(out + j + 2 * kW, a2);
    vstore(out + j + 3 * kW, a3);
  }
  for (; j + kW <= n; j += kW) {
    V acc = vzero();
    for (int64_t l = 0; l < levels; ++l) acc = vfma(vset1(coef[l]), vload(rows[l] + j), acc);
    vstore(out + j, acc);
  }
  for (; j < n; ++j) {
    float acc = 0.0f;
    for (int64_t l = 0; l < levels; ++l) acc += coef[l] * to_float(rows[l][j]);
    store_as(out + j, acc);
  }
}

// A node's logit for one token: w_in[node] . x (+ b_in[node]). Every forward path computes it here,
// which is what keeps the per-token and the bucketed descents bit-identical.
template <typename T>
float node_logit(const T* xt, const T* w_in, const T* b_in, int64_t node, int64_t in, bool pairs) {
  const float a = row_dot(xt, w_in + node * in, in, pairs);
  return b_in != nullptr ? a + to_float(b_in[node]) : a;
}

template <typename T>
void ultra_forward_per_token(const UltraFwdParams& p) {
  const int64_t L = p.levels, in = p.in_features, out = p.out_features;
  const T* x = static_cast<const T*>(p.x);
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* w_out = static_cast<const T*>(p.w_out);
  const T* b_in = static_cast<const T*>(p.b_in);
  const int64_t groups = (p.tokens + kGroup - 1) / kGroup;
  const bool parallel = p.tokens * L * (in + out) >= kParallelMinWork;
  const bool pairs = bf16_dots<T>();
#pragma omp parallel for schedule(static) if (parallel && groups > 1)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t t0 = g * kGroup;
    const int n = static_cast<int>(p.tokens - t0 < kGroup ? p.tokens - t0 : kGroup);
    int64_t node[kGroup] = {};
    float coef[kGroup][kMaxLevels];
    const T* rows[kGroup][kMaxLevels];
    for (int64_t l = 0; l < L; ++l) {
      for (int k = 0; k < n; ++k) {
        const int64_t t = t0 + k;
        const float a = node_logit(x + t * p.x_row_stride, w_in, b_in, node[k], in, pairs);
        if (p.path != nullptr) {  // kept for the backward; inference passes null
          p.path[t * L + l] = static_cast<int32_t>(node[k]);
          p.preact[t * L + l] = a;
        }
        coef[k][l] = act_value(p.act, a);
        rows[k][l] = w_out + node[k] * out;
        node[k] = 2 * node[k] + 1 + (a > 0.0f ? 1 : 0);
        if (l + 1 < L) prefetch_row(w_in + node[k] * in, in);
      }
    }
    for (int k = 0; k < n; ++k) {
      combine_rows(coef[k], rows[k], L, static_cast<T*>(p.y) + (t0 + k) * out, out);
    }
  }
}

// Batched descent (tokens >= kBucketMinTokens). The per-token descent above loads every row it
// visits once per token; below the first levels of a depth-11 tree those rows come from memory (the
// two tables are 25 MB at width 768 in fp32). Tokens that reach the same node share its rows, so:
//   1. per token (interleaved as above), the top `top` levels, whose rows stay in L2 (the next
//      group's x rows are prefetched meanwhile);
//   2. a counting sort of the tokens by their node at level `top` (a bucket per node, ~8 tokens);
//   3. per bucket, the subtree below its node, depth first: a node's w_in row is loaded once for all
//      of the bucket's tokens that reach it (their x rows stay in L1/L2), and the tokens are stably
//      partitioned left/right on the way down, which leaves the bucket in path order (the x rows
//      of the bucket the thread takes next are prefetched into L2 first);
//   4. the output combine of the bucket's tokens in that order: consecutive tokens share their path
//      prefix, so most w_out rows are still in L1; the rows where the next token's path differs
//      are prefetched while the current token combines.
// Same dot products, activations and combine as the per-token kernel: bit-identical outputs (tested).
// Tried and dropped (bench/results/fff/NOTES.md): accumulating the output in fp32 rows level by
// level inside the descent (breadth first, with every next-level row prefetched): the accumulator
// traffic cost more than the w_out row loads it saved.
constexpr int64_t kBucketMinTokens = 64;
constexpr int64_t kBucketTokens = 8;         // tokens per bucket aimed at
constexpr int64_t kTopRowBytes = 256 << 10;  // the top levels' w_in rows, kept in L2

template <typename T>
void prefetch_row_l2(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

template <typename T>
struct Subtree {
  const T* x;
  int64_t x_row_stride;
  const T* w_in;
  const T* b_in;
  int64_t in, levels;
  fastlayers::fff::Activation act;
  int32_t* path;   // [tokens, levels]: the caller's (kept for the backward) or a workspace
  float* coef;     // [tokens, levels]: act(a_l)
  float* preact;   // null, or the caller's [tokens, levels]
  int32_t* right;  // partition scratch, >= the bucket's size
  bool pairs;      // bf16_dots()
};

// seg: the n tokens that reached `node` (at `level`), in path order on return.
template <typename T>
void descend_subtree(const Subtree<T>& s, int64_t node, int64_t level, int32_t* seg, int64_t n) {
  int64_t nl = 0, nr = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = seg[i];
    const float a = node_logit(s.x + t * s.x_row_stride, s.w_in, s.b_in, node, s.in, s.pairs);
    s.path[t * s.levels + level] = static_cast<int32_t>(node);
    s.coef[t * s.levels + level] = act_value(s.act, a);
    if (s.preact != nullptr) s.preact[t * s.levels + level] = a;
    if (a > 0.0f) {
      s.right[nr++] = static_cast<int32_t>(t);
    } else {
      seg[nl++] = static_cast<int32_t>(t);  // stable: nl <= i
    }
  }
  for (int64_t i = 0; i < nr; ++i) seg[nl + i] = s.right[i];
  if (level + 1 == s.levels) return;
  if (nl > 0) descend_subtree(s, 2 * node + 1, level + 1, seg, nl);
  if (nr > 0) descend_subtree(s, 2 * node + 2, level + 1, seg + nl, nr);
}

template <typename T>
void ultra_forward_bucketed(const UltraFwdParams& p, int64_t top) {
  const int64_t L = p.levels, in = p.in_features, out = p.out_features, tokens = p.tokens;
  const T* x = static_cast<const T*>(p.x);
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* w_out = static_cast<const T*>(p.w_out);
  const T* b_in = static_cast<const T*>(p.b_in);
  T* y = static_cast<T*>(p.y);
  const int64_t buckets = int64_t{1} << top, first = buckets - 1;
  int32_t* path = p.path != nullptr ? p.path : new int32_t[tokens * L];
  float* coef = new float[tokens * L];
  int32_t* bucket = new int32_t[tokens];
  int32_t* order = new int32_t[tokens];
  int64_t* offsets = new int64_t[buckets + 1];

  const int64_t groups = (tokens + kGroup - 1) / kGroup;
  const bool parallel = tokens * L * (in + out) >= kParallelMinWork;
  const bool pairs = bf16_dots<T>();
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t t0 = g * kGroup;
    const int n = static_cast<int>(tokens - t0 < kGroup ? tokens - t0 : kGroup);
    int64_t node[kGroup] = {};
    for (int64_t l = 0; l < top; ++l) {
      for (int k = 0; k < n; ++k) {
        const int64_t t = t0 + k;
        const float a = node_logit(x + t * p.x_row_stride, w_in, b_in, node[k], in, pairs);
        path[t * L + l] = static_cast<int32_t>(node[k]);
        coef[t * L + l] = act_value(p.act, a);
        if (p.preact != nullptr) p.preact[t * L + l] = a;
        node[k] = 2 * node[k] + 1 + (a > 0.0f ? 1 : 0);
        if (l + 1 < top) prefetch_row(w_in + node[k] * in, in);
        // The next group's x rows load while this group descends.
        if (l == 0 && t + kGroup < tokens) prefetch_row(x + (t + kGroup) * p.x_row_stride, in);
      }
    }
    for (int k = 0; k < n; ++k) bucket[t0 + k] = static_cast<int32_t>(node[k] - first);
  }

  // Counting sort by bucket, token order within a bucket.
  for (int64_t b = 0; b <= buckets; ++b) offsets[b] = 0;
  for (int64_t t = 0; t < tokens; ++t) ++offsets[bucket[t] + 1];
  for (int64_t b = 0; b < buckets; ++b) offsets[b + 1] += offsets[b];
  for (int64_t t = 0; t < tokens; ++t) order[offsets[bucket[t]]++] = static_cast<int32_t>(t);
  for (int64_t b = buckets; b > 0; --b) offsets[b] = offsets[b - 1];
  offsets[0] = 0;

#pragma omp parallel if (parallel)
  {
    const Subtree<T> s{x, p.x_row_stride, w_in, b_in, in, L, p.act, path, coef, p.preact,
                       new int32_t[tokens], pairs};
    const T* rows[kMaxLevels];
    const int64_t threads = omp_get_num_threads();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < buckets; ++b) {
      int32_t* seg = order + offsets[b];
      const int64_t n = offsets[b + 1] - offsets[b];
      if (n == 0) continue;
      // The x rows of the bucket this thread most likely takes next (dynamic schedule), into L2.
      if (const int64_t nb = b + threads; nb < buckets) {
        for (int64_t i = offsets[nb]; i < offsets[nb + 1]; ++i) {
          prefetch_row_l2(x + int64_t{order[i]} * p.x_row_stride, in);
        }
      }
      descend_subtree(s, first + b, top, seg, n);
      for (int64_t i = 0; i < n; ++i) {
        const int32_t* pt = path + int64_t{seg[i]} * L;
        if (i + 1 < n) {
          const int32_t* pu = path + int64_t{seg[i + 1]} * L;
          for (int64_t l = top + 1; l < L; ++l) {
            if (pu[l] != pt[l]) prefetch_row(w_out + int64_t{pu[l]} * out, out);
          }
        }
        for (int64_t l = 0; l < L; ++l) rows[l] = w_out + int64_t{pt[l]} * out;
        combine_rows(coef + int64_t{seg[i]} * L, rows, L, y + int64_t{seg[i]} * out, out);
      }
    }
    delete[] s.right;
  }
  delete[] offsets;
  delete[] order;
  delete[] bucket;
  delete[] coef;
  if (p.path == nullptr) delete[] path;
}

// Levels descended per token before bucketing (0: the per-token kernel): as many as keep about
// kBucketTokens tokens per bucket and the top levels' rows within kTopRowBytes.
int64_t bucket_top_levels(int64_t tokens, int64_t levels, int64_t in, int64_t elem_bytes) {
  if (tokens < kBucketMinTokens || levels < 3) return 0;
  int64_t top = 0;
  while (top + 1 < levels && (tokens >> (top + 1)) >= kBucketTokens &&
         ((int64_t{2} << (top + 1)) - 1) * in * elem_bytes <= kTopRowBytes) {
    ++top;
  }
  return top;
}

template <typename T>
void ultra_forward_typed(const UltraFwdParams& p) {
  const int64_t top = bucket_top_levels(p.tokens, p.levels, p.in_features, sizeof(T));
  if (top > 0) {
    ultra_forward_bucketed<T>(p, top);
  } else {
    ultra_forward_per_token<T>(p);
  }
}

template <typename T>
void ultra_backward_typed(const UltraBwdParams& p) {
  const int64_t L = p.levels, in = p.in_features, out = p.out_features;
  const int64_t nodes = (int64_t{1} << L) - 1;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* w_in = static_cast<const T*>(p.w_in);
  const T* w_out = static_cast<const T*>(p.w_out);
  const bool parallel = p.tokens * L * (in + out) >= kParallelMinWork;
  const bool pairs = bf16_dots<T>();

  // 1. Per token: coef_l = act'(a_l) * (dy . w_out[n_l]); dx = sum_l coef_l * w_in[n_l].
#pragma omp parallel for schedule(static) if (parallel && p.tokens > 1)
  for (int64_t t = 0; t < p.tokens; ++t) {
    const T* rows[kMaxLevels];
    for (int64_t l = 0; l < L; ++l) {
      const int64_t nd = p.path[t * L + l];
      const float c = row_dot(dy + t * out, w_out + nd * out, out, pairs);
      p.coef[t * L + l] = act_grad(p.act, p.preact[t * L + l]) * c;
      rows[l] = w_in + nd * in;
    }
    combine_rows(p.coef + t * L, rows, L, static_cast<T*>(p.dx) + t * in, in);
  }

  // 2. Per node, over the pairs that visited it in token order (fixed order: deterministic).
  const int64_t width = in > out ? in : out;
#pragma omp parallel if (parallel)
  {
    float* acc = new float[width];
#pragma omp for schedule(dynamic, 16)
    for (int64_t nd = 0; nd < nodes; ++nd) {
      const int64_t begin = p.offsets[nd], end = p.offsets[nd + 1];
      for (int64_t j = 0; j < in; ++j) acc[j] = 0.0f;
      float db = 0.0f;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t pair = p.order[q];
        axpy(p.coef[pair], x + (pair / L) * p.x_row_stride, acc, in);
        db += p.coef[pair];
      }
      T* dwi = static_cast<T*>(p.dw_in) + nd * in;
      for (int64_t j = 0; j < in; ++j) store_as(dwi + j, acc[j]);
      if (p.db_in != nullptr) store_as(static_cast<T*>(p.db_in) + nd, db);
      for (int64_t j = 0; j < out; ++j) acc[j] = 0.0f;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t pair = p.order[q];
        axpy(act_value(p.act, p.preact[pair]), dy + (pair / L) * out, acc, out);
      }
      T* dwo = static_cast<T*>(p.dw_out) + nd * out;
      for (int64_t j = 0; j < out; ++j) store_as(dwo + j, acc[j]);
    }
    delete[] acc;
  }
}

template <typename T>
void hard_forward_typed(const HardFwdParams& p) {
  const int64_t in = p.in_features, out = p.out_features, width = p.width;
  const int64_t first_leaf = (int64_t{1} << p.depth) - 1;
  const T* x = static_cast<const T*>(p.x);
  const T* node_w = static_cast<const T*>(p.node_w);
  const T* node_b = static_cast<const T*>(p.node_b);
  const T* w1 = static_cast<const T*>(p.w1);
  const T* b1 = static_cast<const T*>(p.b1);
  const T* w2 = static_cast<const T*>(p.w2);
  const T* b2 = static_cast<const T*>(p.b2);
  const int64_t groups = (p.tokens + kGroup - 1) / kGroup;
  const bool parallel = p.tokens * (p.depth * in + width * (in + out)) >= kParallelMinWork;
  const bool pairs = bf16_dots<T>();
#pragma omp parallel if (parallel && groups > 1)
  {
    float* h = new float[width + out];
    float* yacc = h + width;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t t0 = g * kGroup;
      const int n = static_cast<int>(p.tokens - t0 < kGroup ? p.tokens - t0 : kGroup);
      int64_t node[kGroup] = {};
      for (int64_t d = 0; d < p.depth; ++d) {
        for (int k = 0; k < n; ++k) {
          const float logit = node_logit(x + (t0 + k) * p.x_row_stride, node_w, node_b, node[k], in, pairs);
          node[k] = 2 * node[k] + 1 + (logit > 0.0f ? 1 : 0);
          if (d + 1 < p.depth) prefetch_row(node_w + node[k] * in, in);
        }
      }
      for (int k = 0; k < n; ++k) {
        const int64_t t = t0 + k, leaf = node[k] - first_leaf;
        if (p.leaf != nullptr) p.leaf[t] = static_cast<int32_t>(leaf);
        if (p.descent_only) continue;
        const T* xt = x + t * p.x_row_stride;
        const T* w1j = w1 + leaf * in * width;
        for (int64_t c = 0; c < width; ++c) h[c] = to_float(b1[leaf * width + c]);
        for (int64_t i = 0; i < in; ++i) axpy(to_float(xt[i]), w1j + i * width, h, width);
        for (int64_t c = 0; c < width; ++c) h[c] = act_value(p.act, h[c]);
        for (int64_t o = 0; o < out; ++o) yacc[o] = to_float(b2[leaf * out + o]);
        const T* w2j = w2 + leaf * width * out;
        for (int64_t c = 0; c < width; ++c) axpy(h[c], w2j + c * out, yacc, out);
        T* yt = static_cast<T*>(p.y) + t * out;
        for (int64_t o = 0; o < out; ++o) store_as(yt + o, yacc[o]);
      }
    }
    delete[] h;
  }
}

}  // namespace

Status ultra_forward(const UltraFwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(ultra_forward_typed, p, kDtypeError) }
Status ultra_backward(const UltraBwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(ultra_backward_typed, p, kDtypeError) }
Status hard_forward(const HardFwdParams& p) { FL_CPU_BY_FLOAT_DTYPE(hard_forward_typed, p, kDtypeError) }


}  // namespace fastlayers::cpu::FL_CPU_ISA::fff
