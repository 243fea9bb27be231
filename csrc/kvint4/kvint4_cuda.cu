// SPDX-License-Identifier: Apache-2.0
// CUDA INT4 KV cache kernels (sm80+). First versions, written for correctness; they ran on an H200
// (dd55068): their tests passed, and decode and prefill were 10-15x slower than bf16 SDPA there.
// The tensor-core prefill's tile (common/tc_attention.cuh) has been rewritten since (registers,
// mma.sync), and the common decode shapes have a tensor-core kernel: their tests pass in the CPU
// emulation, they have not yet run on a GPU.
// Semantics: kvint4.h, python/fastlayers/quant/rope_kv.py and python/fastlayers/ops/kvint4.py.
//
// Cache write (quantize): one warp per (row, group) (per row for the query side). Pass 1 forms
//   the group's fp32 values (RoPE with exact double products and one rounding, times the post-RoPE
//   scale) and their max (a warp reduction); pass 2 forms them again and packs the nibbles. The
//   partner channel of RoPE is read from global memory (the row is in L1/L2 by then). Bit-exact
//   with the CPU kernel and the reference.
// Decode, head_dim 64, 128 or 256 (values too), keys of 192 with values of 128, or multi-head
//   latent attention's 576 / 512, with groups of a multiple of 16 channels: on tensor cores
//   (decode_tc_kernel below: the GQA group's heads as the rows of mma.sync, fragments built in
//   registers from the cache bytes; not yet run on a GPU).
// Decode, other shapes (split-KV flash decoding): grid (batch * kv_heads * slices, splits); a CTA of 4 warps takes
//   one split of the tokens for one (batch, kv head) and serves up to 8 of the GQA group's query
//   heads (4 for multi-head latent attention's 576-channel rows; larger groups in several slices, L2
//   serving the rows again), so every cache byte is read once per slice. Warps take tokens
//   round-robin; lane l owns key channels [l * c, (l + 1) * c) and value channels
//   [l * cv, (l + 1) * cv) (c, cv even, whole bytes: 2 for up to 64 channels, 4 up to 128, 6 up to
//   192, 8 up to 256; where the row is narrower than 32 lanes' worth, head_dim 80 or 96, the lanes
//   at its end reread its last channels with zero queries: LaneScales), dequantizes them in
//   registers and keeps, per head, the running max, sum and output slice (online softmax). The
//   values may be rows of their own or the key rows' first dv channels (v_row). The warps merge in
//   shared memory and write the split's (output / sum, lse); a second kernel combines the splits by
//   their lse.
// Prefill: head_dim 64, 80, 96, 128 or 256, or keys of 192 with values of 128, on tensor cores
//   (common/tc_attention.cuh: 64 query rows per CTA, of one head or, for short or ragged
//   queries, of a GQA group's heads packed token-major (PackedRows, prefill_pack: FlashAttention
//   3's pack_gqa), 64-key tiles dequantized into shared memory, 4 cache bytes per thread and step
//   (cache rows 4-byte aligned), only the tiles up to the CTA's
//   last causal key); fp16/bf16 queries as they are, fp32 ones as fp16 hi + lo parts
//   (fp32_query_factor; the lo products skipped per warp where negligible: FP8-quantized queries);
//   multi-head latent attention's 576 / 512 (values in the key rows or in rows of their own) on
//   tensor cores too (prefill_latent_tc_kernel: 8 warps, each a quarter of the channels of 16 query
//   rows, packed likewise);
//   otherwise one warp per query row on CUDA cores. Both skip each batch row's left padding
//   (DecodeParams::starts).
#include <cmath>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "common/tc_attention.cuh"
#include "kvint4/kvint4.h"

namespace fastlayers::kvint4 {
namespace {

using cuda::to_f;

constexpr float kMinScale = 0.001953125f;  // 2^-9: the smallest group scale
constexpr int kWarps = 4;
// Query heads of a GQA group one decode CTA keeps in registers (a larger group is split into slices
// of this many heads, one CTA each, L2 serving the cache rows to the slices): 8, or 4 for
// multi-head latent attention's 576-channel rows.
constexpr int kSliceHeads = 8;
constexpr int kLatentSliceHeads = 4;
constexpr int kMaxChannelsPerLane = 8;  // head_dim <= 256 (and 576 / 512: multi-head latent attention)
constexpr int kLatentD = 576, kLatentDv = 512;  // DeepSeek's latent + RoPE part / latent
// Keys of 128 + 64 (RoPE) channels with values of 128 of their own (MiMo-V2-Flash; DeepSeek's
// multi-head latent attention unabsorbed): a tensor-core shape besides d = dv.
using cuda::tc::kWideKeyD;
using cuda::tc::kWideKeyDv;
constexpr int kTokensPerSplit = 256;

__host__ __device__ inline float fp8e4m3_value(uint8_t code) {
  const uint32_t exp = (code >> 3) & 15u, man = code & 7u;
  float v;
  if (exp == 0) {
    v = static_cast<float>(man) * 0.001953125f;  // subnormal: man * 2^-9 (exact)
  } else if (exp == 15 && man == 7) {
    v = NAN;
  } else {  // (8 + man) * 2^(exp - 10): the fp32 bits directly (ldexpf is a slow call on a GPU)
    const uint32_t bits = ((exp + 120u) << 23) | (man << 20);
    memcpy(&v, &bits, sizeof(v));
  }
  return (code & 0x80u) ? -v : v;
}

// ---- Cache write ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float value_at(const QuantizeParams& p, const T* x, const float* cs,
                                          const float* sn, const float* post, int64_t c) {
  float v;
  if (cs != nullptr) {
    const int64_t half = p.d / 2;
    double rot;
    if (p.interleaved) {
      rot = (c % 2 == 0) ? -static_cast<double>(to_f(x[c + 1])) : static_cast<double>(to_f(x[c - 1]));
    } else {
      rot = c < half ? -static_cast<double>(to_f(x[c + half])) : static_cast<double>(to_f(x[c - half]));
    }
    // Both products are exact in double, so FMA contraction cannot change the one rounding.
    v = static_cast<float>(static_cast<double>(to_f(x[c])) * cs[c] + rot * sn[c]);
  } else {
    v = to_f(x[c]);
  }
  return post != nullptr ? v * post[c] : v;
}

using cuda::nan_max;

using cuda::tc::seen;  // (a softmax sum that makes an output: > 0, or NaN)

// The merge of a row's partial softmaxes (the warps of a CTA, or the splits of a row): the largest
// partial max, and whether any partial sum is NaN (a NaN score, or inf - inf), which makes the row
// NaN. (fmaxf alone would skip the NaN.)
struct RowMax {
  float mx = -INFINITY;
  bool nan = false;
  __device__ __forceinline__ void add(float m, float sum) {
    mx = fmaxf(mx, m);
    nan = nan || sum != sum;
  }
  // what the weighted sums start from: 0, or NaN for a NaN row
  __device__ __forceinline__ float zero() const { return nan ? NAN : 0.0f; }
  // whether the partials need weighting: no NaN, and some partial saw a key
  __device__ __forceinline__ bool weigh() const { return !nan && mx != -INFINITY; }
};

// One warp per (row, group) (per row for the query side): lane l forms channels g0 + l, + 32, ...
// for the max (a warp reduction) and the query side's output, channel pairs g0 + 2 l, + 64, ...
// for the packed bytes. (It was one thread per row or group: at decode, 8 to 32 threads for a
// whole call, each walking its channels alone.)
template <typename T>
__global__ void quantize_kernel(const QuantizeParams p) {
  const bool query = p.q_out != nullptr;  // the query side: one group of d channels
  const int64_t groups = query ? 1 : p.d / p.group, len = query ? p.d : p.group;
  const int64_t id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (id >= p.rows * groups) return;  // (the whole warp)
  const int64_t r = id / groups, g0 = (id % groups) * len;
  const int64_t o = query ? 0 : output_row(p, r);
  if (o < 0) return;  // (a paged write's padding token: the whole warp)
  const T* x = static_cast<const T*>(p.x) + r * p.d;
  const float* post = p.post_scale != nullptr ? p.post_scale + ((r / p.tokens) % p.heads) * p.d : nullptr;
  const float *cs = nullptr, *sn = nullptr;
  if (p.cos != nullptr) {
    const int64_t t = r % p.tokens, b = r / (p.tokens * p.heads);
    cs = p.cos + b * p.cos_batch_stride + t * p.d;
    sn = p.sin + b * p.cos_batch_stride + t * p.d;
  }
  if (query && !p.q_fp8) {
    for (int64_t c = lane; c < p.d; c += 32) p.q_out[r * p.d + c] = value_at(p, x, cs, sn, post, c);
    return;
  }
  float amax = 0.0f;
  for (int64_t c = g0 + lane; c < g0 + len; c += 32) amax = nan_max(amax, fabsf(value_at(p, x, cs, sn, post, c)));
  amax = cuda::warp_nan_max(amax);
  if (query) {  // q_out[r] = fp8(row / s) * s, s = max|row| / 448 (1 for an all-zero row)
    const float s = amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f;
    const cuda::ReciprocalDivisor by_s(s);  // (the correctly rounded quotient, as __fdiv_rn)
    for (int64_t c = lane; c < p.d; c += 32) {
      const float q = fp8e4m3_value(cuda::to_fp8e4m3(by_s(value_at(p, x, cs, sn, post, c))));
      p.q_out[r * p.d + c] = __fmul_rn(q, s);
    }
    return;
  }
  const uint8_t code = cuda::to_fp8e4m3(amax / 7.0f);
  float s8 = fp8e4m3_value(code);
  if (s8 < kMinScale) s8 = kMinScale;  // (NaN stays: the group dequantizes to NaN)
  if (lane == 0) reinterpret_cast<uint8_t*>(p.scales)[o * groups + g0 / p.group] = cuda::to_fp8e4m3(s8);
  uint8_t* out = p.packed + o * (p.d / 2);
  for (int64_t c = g0 + 2 * lane; c < g0 + len; c += 64) {
    int q[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float qf = rintf(__fdiv_rn(value_at(p, x, cs, sn, post, c + e), s8));
      qf = qf != qf ? 0.0f : fminf(fmaxf(qf, -8.0f), 7.0f);
      q[e] = static_cast<int>(qf) & 15;
    }
    out[c / 2] = static_cast<uint8_t>(q[0] | (q[1] << 4));
  }
}

template <typename T>
Status quantize_typed(const QuantizeParams& p, cudaStream_t stream) {
  const int64_t threads = p.rows * (p.q_out != nullptr ? 1 : p.d / p.group) * 32;
  const int block = 128;
  quantize_kernel<T><<<static_cast<unsigned>((threads + block - 1) / block), block, 0, stream>>>(p);
  return cuda::last_launch_status();
}

// ---- Decode -----------------------------------------------------------------------------------

struct SplitPlan {
  int64_t splits, chunk;
};

// `requested` splits (DecodeParams::splits), or for 0 one per kTokensPerSplit tokens; at most
// kMaxDecodeSplits and one per token, at least one. (Splits past the last token, where
// ceil(length / splits) tokens each leave some empty, give lse -inf: the combine skips them.)
SplitPlan split_plan(int64_t length, int64_t requested) {
  int64_t splits = requested > 0 ? requested : (length + kTokensPerSplit - 1) / kTokensPerSplit;
  if (splits > kMaxDecodeSplits) splits = kMaxDecodeSplits;
  if (splits > length) splits = length;
  if (splits < 1) splits = 1;
  return {splits, (length + splits - 1) / splits};
}

// Logit soft-capping (Gemma 2): cap * tanh(s / cap) when cap > 0, s otherwise.
__device__ __forceinline__ float softcapped(float s, float cap) {
  return cap > 0.0f ? cap * tanhf(s / cap) : s;
}

// The two INT4 values of a cache byte (even channel in the low nibble, two's complement) times
// their group scale: exact in fp32, and in fp16/bf16. (Signed: in uint32_t arithmetic a negative
// nibble's "- 8" wraps to 2^32 - n.)
__device__ __forceinline__ float2 dequant_byte(uint32_t byte, float scale) {
  return make_float2(static_cast<float>(static_cast<int>((byte & 15u) ^ 8u) - 8) * scale,
                     static_cast<float>(static_cast<int>((byte >> 4) ^ 8u) - 8) * scale);
}

// This lane's bytes of one cached row: the nibble bytes of its C channels and their group-scale
// codes, fetched apart from their use so that a warp can have several rows' loads in flight.
template <int C>
struct LaneBytes {
  uint8_t nibbles[C / 2], scales[C / 2];
};

// The C channels of a row of `width` this lane reads, [start, start + C), and where their
// group-scale codes sit: the same for every row, so computed once (a 64-bit division per byte and
// token was most of the decode loop's instructions). Lane l owns channels [l * C, (l + 1) * C) of
// the row; where the row is narrower than 32 * C (head_dim 80: 20 lanes of 4) the lanes at its end
// read its last C channels instead and own only those past `owned` of them (none past the row's
// end), so the loop reads every lane's bytes unguarded: a lane's channels it does not own get zero
// queries and their outputs are not stored.
template <int C>
struct LaneScales {
  int at[C / 2];
  int start;  // the first channel read (even: whole bytes)
  int owned;  // channels [start + owned, start + C) are this lane's; C: none
  __device__ LaneScales(int lane, int64_t group, int64_t width) {
    const int g = static_cast<int>(group), w = static_cast<int>(width);  // (head_dim <= 576)
    const int first = lane * C;
    start = first < w - C ? first : w - C;  // (width >= C: lane_channels)
    owned = first < w ? first - start : C;
#pragma unroll
    for (int j = 0; j < C; j += 2) at[j / 2] = (start + j) / g;  // (group even: one per byte)
  }
  __device__ bool owns(int j) const { return j >= owned; }
};

template <int C>
__device__ __forceinline__ void fetch_lane(const uint8_t* row, const uint8_t* scales, const LaneScales<C>& at,
                                           LaneBytes<C>& r) {
#pragma unroll
  for (int j = 0; j < C; j += 2) {
    r.nibbles[j / 2] = row[at.start / 2 + j / 2];
    r.scales[j / 2] = scales[at.at[j / 2]];
  }
}

template <int C>
__device__ __forceinline__ void dequant_fetched(const LaneBytes<C>& r, float (&v)[C]) {
#pragma unroll
  for (int j = 0; j < C; j += 2) {
    const float2 pair = dequant_byte(r.nibbles[j / 2], fp8e4m3_value(r.scales[j / 2]));
    v[j] = pair.x;
    v[j + 1] = pair.y;
  }
}

// Dequantizes this lane's channels of one cached row into v[0, C).
template <int C>
__device__ __forceinline__ void dequant_lane(const uint8_t* row, const uint8_t* scales, const LaneScales<C>& at,
                                             float (&v)[C]) {
  LaneBytes<C> r;
  fetch_lane<C>(row, scales, at, r);
  dequant_fetched<C>(r, v);
}

// Grid (batch * kv heads * slices, splits): the CTA serves query heads [h0, h0 + gh) of its kv
// head's group (H at most).
template <int C, int CV, int H>
__global__ void __launch_bounds__(kWarps * 32) decode_split_kernel(const DecodeParams p, int64_t chunk,
                                                                  int64_t splits, float* part_out,
                                                                  float* part_lse) {
  const int64_t group_heads = p.hq / p.hkv, slices = (group_heads + H - 1) / H;
  const int64_t bk = blockIdx.x / slices, split = blockIdx.y;
  const int64_t b = bk / p.hkv, kh = bk % p.hkv, h0 = (blockIdx.x % slices) * H;
  const int gh = static_cast<int>(group_heads - h0 < H ? group_heads - h0 : H);
  const int64_t qh0 = b * p.hq + kh * group_heads + h0;  // the CTA's first [batch * hq] row
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t first = first_token(p, b);  // (left padding skipped)
  const int64_t t0 = split * chunk > first ? split * chunk : first;
  const int64_t end = end_token(p, b);
  const int64_t t1 = split * chunk + chunk < end ? split * chunk + chunk : end;
  const int64_t dh = p.d / 2, ng = p.d / p.group, dv = value_dim(p);
  const int64_t v_row = value_row(p), vs_row = value_scale_row(p);

  const LaneScales<C> k_at(lane, p.group, p.d);
  const LaneScales<CV> v_at(lane, p.group, dv);
  float q[H][C], acc[H][CV], m[H], l[H];
#pragma unroll
  for (int h = 0; h < H; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < C; ++j) q[h][j] = h < gh && k_at.owns(j) ? p.q[(qh0 + h) * p.d + k_at.start + j] : 0.0f;
#pragma unroll
    for (int j = 0; j < CV; ++j) acc[h][j] = 0.0f;
  }
  const TokenRows rows = token_rows(p, b, kh);
  const uint8_t* k_scales = reinterpret_cast<const uint8_t*>(p.k_scale);
  const uint8_t* v_scales = reinterpret_cast<const uint8_t*>(p.v_scale);
  // A warp fetches the bytes of its next kAhead tokens before it uses the first: one token at a
  // time left each lane waiting on memory once per token (int4_kv_decode at 0.03-0.04 of the copy
  // bandwidth on the H200, dd55068). The tokens are still consumed in the same order.
  constexpr int kAhead = C + CV <= 8 ? 4 : (C + CV <= 16 ? 2 : 1);
  for (int64_t t = t0 + warp; t < t1; t += kWarps * kAhead) {
    LaneBytes<C> kb[kAhead];
    LaneBytes<CV> vb[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t tu = t + u * kWarps;
      if (tu < t1) {
        const int64_t r = rows(tu);
        fetch_lane<C>(p.k + r * dh, k_scales + r * ng, k_at, kb[u]);
        fetch_lane<CV>(p.v + r * v_row, v_scales + r * vs_row, v_at, vb[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (t + u * kWarps >= t1) break;
      float k[C], v[CV];
      dequant_fetched<C>(kb[u], k);
      dequant_fetched<CV>(vb[u], v);
#pragma unroll
      for (int h = 0; h < H; ++h) {
        if (h >= gh) continue;  // (fully unrolled: the arrays stay in registers)
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < C; ++j) s += q[h][j] * k[j];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        s = softcapped(s * p.scale, p.softcap);
        const float m_new = fmaxf(m[h], s);
        const float alpha = m[h] == -INFINITY ? 0.0f : expf(m[h] - m_new);
        const float e = expf(s - m_new);
        l[h] = l[h] * alpha + e;
#pragma unroll
        for (int j = 0; j < CV; ++j) acc[h][j] = acc[h][j] * alpha + e * v[j];
        m[h] = m_new;
      }
    }
  }

  // Merge the warps: shared [warps][heads] (m, l) and [warps][heads][dv] acc.
  extern __shared__ __align__(16) float smem[];
  float* sm = smem;            // [kWarps * H]
  float* sl = sm + kWarps * H;  // [kWarps * H]
  float* sacc = sl + kWarps * H;  // [kWarps * H * dv]
#pragma unroll
  for (int h = 0; h < H; ++h) {
    if (h >= gh) continue;
    if (lane == 0) {
      sm[warp * H + h] = m[h];
      sl[warp * H + h] = l[h];
    }
#pragma unroll
    for (int j = 0; j < CV; ++j) {
      if (v_at.owns(j)) sacc[(warp * H + h) * dv + v_at.start + j] = acc[h][j];
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(gh) * dv; i += blockDim.x) {
    const int h = static_cast<int>(i / dv);
    const int64_t c = i % dv;
    RowMax row;
    for (int w = 0; w < kWarps; ++w) row.add(sm[w * H + h], sl[w * H + h]);
    float sum = row.zero(), o = row.zero();
    if (row.weigh()) {
      for (int w = 0; w < kWarps; ++w) {
        const float mw = sm[w * H + h];
        if (mw == -INFINITY) continue;
        const float f = expf(mw - row.mx);
        sum += sl[w * H + h] * f;
        o += sacc[(w * H + h) * dv + c] * f;
      }
    }
    const int64_t qh = qh0 + h;  // [batch * hq] row
    part_out[(qh * splits + split) * dv + c] = seen(sum) ? o / sum : 0.0f;
    if (c == 0) part_lse[qh * splits + split] = seen(sum) ? row.mx + logf(sum) : -INFINITY;
  }
}

// out[qh] = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse); lse = max + log sum w.
__global__ void decode_combine_kernel(const DecodeParams p, int64_t splits, const float* part_out,
                                      const float* part_lse) {
  const int64_t qh = blockIdx.x;
  RowMax row;  // (a split's lse is NaN where its sum was)
  for (int64_t s = 0; s < splits; ++s) row.add(part_lse[qh * splits + s], part_lse[qh * splits + s]);
  float total = row.zero();
  if (row.weigh()) {
    for (int64_t s = 0; s < splits; ++s) total += expf(part_lse[qh * splits + s] - row.mx);
  }
  const int64_t dv = value_dim(p);
  for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
    float o = row.zero();
    if (total > 0.0f) {
      for (int64_t s = 0; s < splits; ++s) {
        const float w = expf(part_lse[qh * splits + s] - row.mx);
        if (w > 0.0f) o += w * part_out[(qh * splits + s) * dv + c];
      }
      o /= total;
    }
    p.out[qh * dv + c] = o;
  }
  if (threadIdx.x == 0) p.lse[qh] = seen(total) ? row.mx + logf(total) : -INFINITY;
}

// Prefill (q_tokens > 1): one warp per (batch, query head, query token) walks the cached tokens from
// its row's start up to its causal limit with an online softmax, lanes dequantizing their channels of
// each key and value row (L2 serves the rows to the GQA group's warps). A query inside its row's
// left padding sees nothing: zeros, lse -inf. Query token i is the row's cache token
// end_token - query_count + i (a paged cache or per-row lengths: the row's own end; a padding query
// past the row's query_count sees nothing). Ragged queries (q_starts): one warp per row of q
// (token, query head), its batch row found by bisection; a token outside the rows' queries is
// not written.
template <int C, int CV>
__global__ void __launch_bounds__(kWarps * 32) prefill_kernel(const DecodeParams p) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  int64_t i, b, h;
  if (p.q_starts == nullptr) {
    if (w >= p.batch * p.hq * p.q_tokens) return;
    const int64_t bh = w / p.q_tokens;
    i = w % p.q_tokens, b = bh / p.hq, h = bh % p.hq;
  } else {
    if (w >= p.q_total * p.hq) return;
    const int64_t t = w / p.hq;
    h = w % p.hq;
    int64_t lo = 0, hi = p.batch;  // the last row b with q_starts[b] <= t
    if (t < p.q_starts[0] || t >= p.q_starts[p.batch]) return;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.q_starts[mid] <= t) lo = mid;
      else hi = mid;
    }
    b = lo, i = t - p.q_starts[b];
    if (i >= query_count(p, b)) return;
  }
  const int64_t kh = h / (p.hq / p.hkv), dh = p.d / 2, ng = p.d / p.group;
  const int64_t limit = query_limit(p, b, i);  // the last visible cached token
  const int64_t v_row = value_row(p), vs_row = value_scale_row(p), dv = value_dim(p);
  const LaneScales<C> k_at(lane, p.group, p.d);
  const LaneScales<CV> v_at(lane, p.group, dv);
  float q[C], acc[CV], m = -INFINITY, l = 0.0f;
#pragma unroll
  for (int j = 0; j < C; ++j) q[j] = k_at.owns(j) ? p.q[w * p.d + k_at.start + j] : 0.0f;
#pragma unroll
  for (int j = 0; j < CV; ++j) acc[j] = 0.0f;
  const TokenRows rows = token_rows(p, b, kh);
  for (int64_t t = first_token(p, b); t <= limit; ++t) {
    float k[C], v[CV];
    const int64_t r = rows(t);
    dequant_lane<C>(p.k + r * dh, reinterpret_cast<const uint8_t*>(p.k_scale) + r * ng, k_at, k);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < C; ++j) s += q[j] * k[j];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    s = softcapped(s * p.scale, p.softcap);
    dequant_lane<CV>(p.v + r * v_row, reinterpret_cast<const uint8_t*>(p.v_scale) + r * vs_row, v_at, v);
    const float m_new = fmaxf(m, s);
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    const float e = expf(s - m_new);
    l = l * alpha + e;
#pragma unroll
    for (int j = 0; j < CV; ++j) acc[j] = acc[j] * alpha + e * v[j];
    m = m_new;
  }
  const float inv = seen(l) ? 1.0f / l : 0.0f;
#pragma unroll
  for (int j = 0; j < CV; ++j) {
    if (v_at.owns(j)) p.out[w * dv + v_at.start + j] = acc[j] * inv;
  }
  if (lane == 0) p.lse[w] = seen(l) ? m + logf(l) : -INFINITY;
}

// 2^e as a float, e in [-126, 127].
__device__ __forceinline__ float pow2f(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

// fp32 queries on tensor cores (the decode and the prefill): each row times a factor f, then split
// into fp16 hi + lo. f = 448 / max|row|: an FP8-quantized row (q_quantize's q8 * s, its max 448 s)
// becomes its q8 values, exact in fp16 (4 significant bits; f is 1 / s to fp32 rounding), so its
// lo parts are ~2^-22 of the row's max and one product per score suffices; another row keeps
// ~22 bits through both. (1 for a zero row and one with an infinity: nothing to scale.)
__device__ __forceinline__ float fp32_query_factor(float row_max) {
  if (!(row_max > 0.0f && row_max <= 3.402823466e38f)) return 1.0f;
  const float f = 448.0f / row_max;
  return f <= 3.402823466e38f ? f : pow2f(126);  // (a subnormal max)
}

// A lo part at most this (2^-18 of a row's max after its factor) changes a score by less than fp32
// rounding of its sum roughly does (up to 2^-17 relative for 128 terms): then the lo products are
// skipped.
constexpr float kQueryLoLimit = 448.0f / 262144.0f;

// One thread's share of a key tile's cache bytes for the tensor-core prefill (keys of D channels,
// values of DV): 4-byte words of K and of V (8 channels each) and their group-scale codes (one per
// channel pair, byte i for bytes i of the word; the same code in all four when a group spans the
// word), loaded a tile ahead of their use where registers allow, so that the loads are in flight
// during the previous tile's products.
template <int D, int DV>
struct RawTile {
  static constexpr int kKWords = cuda::tc::kKeys * D / 8 / (cuda::tc::kWarps * 32);
  static constexpr int kVWords = cuda::tc::kKeys * DV / 8 / (cuda::tc::kWarps * 32);
  uint32_t k[kKWords], ks[kKWords], v[kVWords], vs[kVWords];
};

// The scale codes of channels c .. c + 7 of a row of codes (groups of g channels, g even).
__device__ __forceinline__ uint32_t word_scale_codes(const uint8_t* scales, int c, int g) {
  if (g % 8 == 0) return static_cast<uint32_t>(scales[c / g]) * 0x01010101u;
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>(scales[(c + 2 * i) / g]) << (8 * i);
  return r;
}

// Thread word i's key (j) and first channel (c) of a tile of rows of D channels, the tile's words
// spread over kThreads threads.
template <int D, int kThreads = cuda::tc::kWarps * 32>
__device__ __forceinline__ void tile_word(int i, int& j, int& c) {
  const int e = static_cast<int>(threadIdx.x) + i * kThreads;
  j = e / (D / 8);
  c = 8 * (e % (D / 8));
}

// Cache rows of a tile load: their bytes (`row` apart from token to token) and scale codes
// (`code_row` apart; groups of `group` channels).
struct TileRows {
  const uint8_t* bytes;
  int64_t row;
  const uint8_t* codes;
  int64_t code_row;
  int group;
};

// Words i0 .. i0 + N - 1 of this thread's share (kThreads threads) of the tile of keys t0 .. t0 +
// nt - 1 of rows of C channels (their rows: `rows`), and their scale codes; zeros (which dequantize
// to 0) past nt and before `start` (left padding: never-written slots could hold NaN scale codes,
// and a masked key's NaN value would still reach P V as 0 * NaN).
template <int C, int kThreads, int N, typename Rows>
__device__ __forceinline__ void fetch_words(const TileRows& src, const Rows& rows, int64_t t0, int64_t nt, int64_t start,
                                            int i0, uint32_t (&w)[N], uint32_t (&codes)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int j, c;
    tile_word<C, kThreads>(i0 + i, j, c);
    w[i] = codes[i] = 0u;
    if (j < nt && t0 + j >= start) {
      const int64_t t = rows(t0 + j);
      w[i] = *reinterpret_cast<const uint32_t*>(src.bytes + t * src.row + c / 2);
      codes[i] = word_scale_codes(src.codes + t * src.code_row, c, src.group);
    }
  }
}

// This thread's words of the tile for the tensor-core prefill (D key channels, DV value channels).
template <int D, int DV, typename Rows>
__device__ __forceinline__ void fetch_tile(const DecodeParams& p, const Rows& rows, int64_t t0, int64_t nt,
                                           int64_t start, RawTile<D, DV>& r) {
  constexpr int kThreads = cuda::tc::kWarps * 32;
  const int g = static_cast<int>(p.group);  // (32-bit divisions: head_dim <= 576)
  const TileRows keys{p.k, D / 2, reinterpret_cast<const uint8_t*>(p.k_scale), D / p.group, g};
  const TileRows values{p.v, value_row(p), reinterpret_cast<const uint8_t*>(p.v_scale), value_scale_row(p), g};
  fetch_words<D, kThreads>(keys, rows, t0, nt, start, 0, r.k, r.ks);
  fetch_words<DV, kThreads>(values, rows, t0, nt, start, 0, r.v, r.vs);
}

// 8 channels from a cache word and their scale codes, as 16-bit values (exact: a nibble times an
// FP8 scale).
template <typename T>
__device__ __forceinline__ uint4 dequant_word(uint32_t w, uint32_t codes) {
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = dequant_byte((w >> (8 * i)) & 0xFFu, fp8e4m3_value(static_cast<uint8_t>(codes >> (8 * i))));
    out[i] = cuda::ptx::pack2<T>(pair.x, pair.y);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Dequantizes words i0 .. i0 + N - 1 of this thread's share (kThreads threads; fetch_words's) of
// a tile of rows of C channels into its rows in shared memory (ld elements apart).
template <typename T, int C, int kThreads, int N>
__device__ __forceinline__ void store_words(T* dst, int ld, int i0, const uint32_t (&w)[N],
                                            const uint32_t (&codes)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int j, c;
    tile_word<C, kThreads>(i0 + i, j, c);
    *reinterpret_cast<uint4*>(dst + j * ld + c) = dequant_word<T>(w[i], codes[i]);
  }
}

// This thread's share (kThreads threads) of the tile of keys t0 .. t0 + nt - 1, rows of C channels,
// dequantized into their rows in shared memory (ld elements apart), kBatch words in flight at a time
// (#pragma unroll 1: a kernel whose fragments and accumulators hold most registers).
template <typename T, int C, int kThreads, int kBatch, typename Rows>
__device__ __forceinline__ void dequantize_tile(const TileRows& src, const Rows& rows, int64_t t0, int64_t nt,
                                                int64_t start, T* dst, int ld) {
  constexpr int kWords = cuda::tc::kKeys * C / 8 / kThreads;
  static_assert(kWords % kBatch == 0, "whole batches");
#pragma unroll 1
  for (int i0 = 0; i0 < kWords; i0 += kBatch) {
    uint32_t w[kBatch], codes[kBatch];
    fetch_words<C, kThreads>(src, rows, t0, nt, start, i0, w, codes);
    store_words<T, C, kThreads>(dst, ld, i0, w, codes);
  }
}

// Dequantizes this thread's words into the K and V rows in shared memory.
template <typename T, int D, int DV>
__device__ __forceinline__ void store_tile(const RawTile<D, DV>& r, T* sk, T* sv) {
  using S = cuda::tc::Smem<D, DV>;
  store_words<T, D, cuda::tc::kWarps * 32>(sk, S::kLd, 0, r.k, r.ks);
  store_words<T, DV, cuda::tc::kWarps * 32>(sv, S::kLdV, 0, r.v, r.vs);
}

// The fp32-query prefill's shared memory past the tile's: Q_lo (Q's layout), the rows' factors.
template <int D, int DV>
struct PrefillSplitSmem {
  using S = cuda::tc::Smem<D, DV>;
  static constexpr size_t kQLo = S::kExtra;
  static constexpr size_t kRowScale = kQLo + size_t(cuda::tc::kRows) * S::kLd * 2;
  static constexpr size_t kExtraBytes = kRowScale + cuda::tc::kRows * sizeof(float) - S::kExtra;
};

// fp32 queries (row r from row_ptr(r), D channels) into rows r0 .. r0 + n - 1 of Q (hi) and Q_lo
// (stride ld; rows past `rows` zero), one warp: each row times its f (fp32_query_factor), rs[row] =
// 1 / f; returns whether a lo part of this lane's exceeds kQueryLoLimit (the caller reduces it over
// its warp or CTA).
template <int D, typename RowPtr>
__device__ bool load_split_rows(const RowPtr& row_ptr, int64_t rows, int r0, int n, __half* hi, __half* lo, float* rs,
                                int ld) {
  const int lane = threadIdx.x & 31;
  bool lo_needed = false;
  for (int r = r0; r < r0 + n; ++r) {
    const float* src = r < rows ? row_ptr(r) : nullptr;
    float mx = 0.0f;
    if (src != nullptr) {
      for (int c = lane; c < D; c += 32) mx = fmaxf(mx, fabsf(src[c]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float f = fp32_query_factor(mx);
    for (int c = lane; c < D; c += 32) {
      const float x = src != nullptr ? src[c] * f : 0.0f;
      const __half h = __float2half_rn(x);
      const float rest = x - __half2float(h);
      hi[r * ld + c] = h;
      lo[r * ld + c] = __float2half_rn(rest);
      lo_needed = lo_needed || fabsf(rest) > kQueryLoLimit;
    }
    if (lane == 0) rs[r] = 1.0f / f;
  }
  return lo_needed;
}

// fp32 queries (row i of the tile from row_ptr(i)) into the warp's 16 rows of the tile's Q (hi) and
// Q_lo; returns whether the warp needs the lo products (warp-uniform).
template <int D, int DV, typename RowPtr>
__device__ bool load_split_queries(const RowPtr& row_ptr, int64_t rows, unsigned char* smem) {
  using L = PrefillSplitSmem<D, DV>;
  auto* hi = reinterpret_cast<__half*>(smem + L::S::kQ);
  auto* lo = reinterpret_cast<__half*>(smem + L::kQLo);
  auto* rs = reinterpret_cast<float*>(smem + L::kRowScale);
  const int warp = threadIdx.x >> 5;
  return __any_sync(0xffffffffu, load_split_rows<D>(row_ptr, rows, warp * 16, 16, hi, lo, rs, L::S::kLd));
}

// A prefill CTA's query rows, FlashAttention 3's pack_gqa: `pack` query heads from h0 share the
// tile (1: one head, the rows its consecutive query tokens), their rows token-major: the CTA's
// row i is the call's packed row r0 + i, query token (r0 + i) / pack of head h0 + (r0 + i) %
// pack. Packing a GQA group's heads, a decode row or a few speculative tokens fill `pack` rows of
// one tile (its key tiles dequantized once for them all) instead of one row of a tile per head.
// (Packed rows number q_tokens x pack < 2^31: prefill_pack; heads below 65536:
// prefill_tc_queries_ok.) 16 bytes: the kernels keep the CTA's in a row's padding (in_pad).
struct PackedRows {
  int h0, tok0, rem0, pack;  // first head, the tile's first query token (r0 / pack), r0 % pack, heads
  __device__ PackedRows(int h0_, int r0, int pack_) : h0(h0_), tok0(r0 / pack_), rem0(r0 % pack_), pack(pack_) {}
  __device__ int64_t token(int i) const { return tok0 + (rem0 + i) / pack; }
  __device__ int64_t head(int i) const { return h0 + (rem0 + i) % pack; }
  // Row i's row of q, out and lse (query_row) in batch row b.
  __device__ int64_t row(const DecodeParams& p, int64_t b, int i) const { return query_row(p, b, head(i), token(i)); }
};
static_assert(sizeof(PackedRows) == 16, "one row's padding");

// A CTA's PackedRows in shared memory at `at`: a row's 16 bytes of padding (cuda::tc::kPad) that
// nothing else reads or writes. Written by thread 0 before a block barrier; the key loop and the
// epilogue read the fields there rather than hold them in registers beside the tile's fragments
// (which spilled at head_dim 256), and the tile's shared memory does not grow (at head_dim 256 it
// is exactly the 99 KiB of sm86 / sm89).
__device__ __forceinline__ const PackedRows& in_pad(unsigned char* at, const PackedRows& mine) {
  auto& rows = *reinterpret_cast<PackedRows*>(at);
  if (threadIdx.x == 0) rows = mine;
  return rows;
}

// A prefill tile's query rows (CTA-uniform): packed rows r0 .. r0 + all - 1 (`at`'s rows 0 ..
// all - 1; all: up to kRows, the call's q_tokens x pack), of which the first `rows` hold a query
// (query_count: with q_lens the rest are padding; token-major packing keeps them last). The
// padding rows get zeros and lse -inf here, before the tile's work (which then takes `rows` alone,
// as without q_lens: no register of the loop for them). Ragged queries (q_starts) have no padding
// rows. Returns rows (0: nothing left to do).
template <int kRows, int DV>
__device__ __forceinline__ int64_t tile_query_rows(const DecodeParams& p, int64_t b, const PackedRows& at, int r0) {
  const int64_t total = p.q_tokens * at.pack;
  const int64_t all = total - r0 < kRows ? total - r0 : kRows;
  const int64_t held = query_count(p, b) * at.pack - r0;
  const int64_t rows = held < 0 ? 0 : (held < all ? held : all);
  if (rows < all && p.q_starts == nullptr) {
    const int n = static_cast<int>(all - rows);
    for (int e = threadIdx.x; e < n * DV; e += blockDim.x) {
      p.out[at.row(p, b, static_cast<int>(rows) + e / DV) * DV + e % DV] = 0.0f;
    }
    for (int r = threadIdx.x; r < n; r += blockDim.x) p.lse[at.row(p, b, static_cast<int>(rows) + r)] = -INFINITY;
  }
  return rows;
}

// The tensor-core prefills' launch: the cache and queries, and the query heads per CTA.
struct PrefillTcArgs {
  DecodeParams p;
  int pack;
};

// Tensor-core prefill: CTA (64 query rows of `pack` query heads (PackedRows), batch row). Query
// token i is cache token first + i and sees cache tokens start .. first + i (start: the row's left
// padding skipped; the key tiles before it are not read). Keys of D channels, values of DV.
// kSplit: fp32 queries (T = __half; WarpTile's hi + lo). kPaged: a paged cache (p.block_table).
template <typename T, int D, int DV, bool kSplit, bool kPaged>
__global__ void __launch_bounds__(cuda::tc::kWarps * 32) prefill_tc_kernel(const PrefillTcArgs args) {
  namespace tc = cuda::tc;  // the tensor-core tile: its kRows / kKeys, not this file's
  using S = tc::Smem<D, DV>;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  const DecodeParams& p = args.p;
  const int r0 = static_cast<int>(blockIdx.x) * tc::kRows;
  const int64_t b = blockIdx.z;
  const PackedRows mine(static_cast<int>(blockIdx.y) * args.pack, r0, args.pack);
  const int64_t kh = mine.h0 / (p.hq / p.hkv);
  const int64_t rows = tile_query_rows<tc::kRows, DV>(p, b, mine, r0);  // (q_lens: padding written)
  if (rows == 0) return;  // (the whole CTA)
  const int64_t first = end_token(p, b) - query_count(p, b);
  bool use_lo = false;
  if constexpr (kSplit) {
    use_lo = load_split_queries<D, DV>([&](int i) { return p.q + mine.row(p, b, i) * D; }, rows, tc_smem);
  } else {
    const T* q = static_cast<const T*>(p.q16);
    tc::load_rows_async<T, D>(reinterpret_cast<T*>(tc_smem + S::kQ), S::kLd, tc::kRows, static_cast<int>(rows),
                              [&](int i) { return q + mine.row(p, b, i) * D; });
    cuda::ptx::cp_async_commit();
    cuda::ptx::cp_async_wait<0>();
  }
  const PackedRows& q_at = in_pad(tc_smem + S::kQ + D * 2, mine);  // (Q's first row's padding)
  __syncthreads();
  tc::WarpTile<T, D, kSplit, DV> tile(tc_smem);
  if constexpr (kSplit) {
    const auto* rs = reinterpret_cast<const float*>(tc_smem + PrefillSplitSmem<D, DV>::kRowScale);
    tile.sq_lo = reinterpret_cast<const T*>(tc_smem + PrefillSplitSmem<D, DV>::kQLo);
    tile.use_lo = use_lo;
    tile.rs[0] = rs[tile.cta_row(0)];
    tile.rs[1] = rs[tile.cta_row(1)];
  }
  T* sk = reinterpret_cast<T*>(tc_smem + S::kK);
  T* sv = reinterpret_cast<T*>(tc_smem + S::kV);
  const auto at = cache_rows<kPaged>(p, b, kh);
  const int64_t last_key = first + mine.token(static_cast<int>(rows) - 1);  // the CTA's last visible key
  const int64_t start = first_token(p, b);
  const auto tile_keys = [&](int64_t t0) { return last_key + 1 - t0 < tc::kKeys ? last_key + 1 - t0 : tc::kKeys; };
  // The next tile's bytes are in flight during this tile's products, in registers, up to head_dim
  // 128 and for 16-bit queries with values of 128 (at 256 they would take 64 registers beside O's
  // 128, with fp32 queries at 192 / 128 40 beside the lo parts' products: loaded when needed there).
  constexpr bool kPrefetch = D <= 128 || (DV <= 128 && !kSplit);
  RawTile<D, DV> raw;
  int64_t t0 = start / tc::kKeys * tc::kKeys;
  if (kPrefetch && t0 <= last_key) fetch_tile<D, DV>(p, at, t0, tile_keys(t0), start, raw);
  for (; t0 <= last_key; t0 += tc::kKeys) {
    const int64_t nt = tile_keys(t0);
    __syncthreads();  // the previous tile is consumed
    if constexpr (!kPrefetch) fetch_tile<D, DV>(p, at, t0, nt, start, raw);
    store_tile<T, D, DV>(raw, sk, sv);
    if (kPrefetch && t0 + tc::kKeys <= last_key) {
      fetch_tile<D, DV>(p, at, t0 + tc::kKeys, tile_keys(t0 + tc::kKeys), start, raw);
    }
    __syncthreads();
    // Every row sees the whole tile: no mask.
    // (Row i sees keys up to first + q_at.token(i); q_at's fields read from shared memory.)
    if (rows == tc::kRows && nt == tc::kKeys && t0 >= start && t0 + tc::kKeys - 1 <= first + q_at.tok0) {
      tile.step(tc::AllVisible{}, p.scale, p.softcap);
    } else {
      tile.step([&](int i, int j) { return i < rows && t0 + j >= start && t0 + j <= first + q_at.token(i); },
                p.scale, p.softcap);
    }
  }
  const int64_t bz = blockIdx.z;  // (read again: not held through the loop)
  tile.template finish<float>([&](int i) { return i < rows ? p.out + q_at.row(p, bz, i) * DV : nullptr; },
                              [&](int i, float lse) {
                                if (i < rows) p.lse[q_at.row(p, bz, i)] = lse;
                              });
}

template <int D, int DV, bool kSplit>
constexpr size_t prefill_tc_smem() {
  return cuda::tc::Smem<D, DV>::bytes(kSplit ? PrefillSplitSmem<D, DV>::kExtraBytes : 0);
}

// Query heads per CTA of a tensor-core prefill of `rows` query rows a CTA (PackedRows): a GQA
// group's where the call's rows may hold fewer query tokens than its grid (ragged rows of at most
// max_seqlen_q, or q_lens) or packing takes fewer CTAs (q_tokens x group not a multiple of
// rows), as FlashAttention 3's pack_gqa; else 1. Never more CTAs than one head per CTA:
// ceil(n g / rows) <= g ceil(n / rows).
int prefill_pack(const DecodeParams& p, int64_t rows) {
  const int64_t group = p.hq / p.hkv;
  if (group == 1) return 1;
  if (p.q_tokens * group >= (int64_t{1} << 31)) return 1;  // (PackedRows: 32-bit row numbers)
  const bool ragged = p.q_starts != nullptr || p.q_lens != nullptr;
  const bool fewer = (p.q_tokens * group + rows - 1) / rows < group * ((p.q_tokens + rows - 1) / rows);
  return ragged || fewer ? static_cast<int>(group) : 1;
}

// A tensor-core prefill's grid for CTAs of `rows` packed query rows: (tiles, hq / pack, batch).
dim3 prefill_grid(const PrefillTcArgs& a, int64_t rows) {
  return dim3(static_cast<unsigned>((a.p.q_tokens * a.pack + rows - 1) / rows), static_cast<unsigned>(a.p.hq / a.pack),
              static_cast<unsigned>(a.p.batch));
}

template <typename T, int D, int DV, bool kSplit, bool kPaged>
Status prefill_tc(const DecodeParams& p, cudaStream_t stream) {
  static bool configured[64] = {};
  const PrefillTcArgs args{p, prefill_pack(p, cuda::tc::kRows)};
  return cuda::tc::launch(prefill_tc_kernel<T, D, DV, kSplit, kPaged>, prefill_grid(args, cuda::tc::kRows),
                          prefill_tc_smem<D, DV, kSplit>(), args, stream, configured);
}

// The tensor-core prefills' queries (fp16/bf16 ones given in q16, 16-byte aligned, or fp32 ones),
// key rows (read 4 bytes at a time) and grid (batch and query heads within 65535, query tokens
// below 2^30).
bool prefill_tc_queries_ok(const DecodeParams& p) {
  if (p.q16 != nullptr) {
    if (!cuda::is_aligned(p.q16, 16)) return false;
    if (p.q16_dtype != DType::kFloat16 && p.q16_dtype != DType::kBFloat16) return false;
  } else if (p.q == nullptr) {
    return false;
  }
  // (PackedRows numbers a row's query tokens in 32 bits)
  return cuda::is_aligned(p.k, 4) && p.batch <= 65535 && p.hq <= 65535 && p.q_tokens < (int64_t{1} << 30);
}

// ---- Tensor-core prefill for multi-head latent attention -------------------------------------
// Keys of 576 channels (latent + RoPE part), values the key rows' first 512 (read in place) or rows
// of 512 of their own. A warp's 16 rows of the 512-channel output would take 256 fp32 registers a
// lane, so the work is split as in the latent decode: a CTA of 8 warps owns 32 query rows of one
// head, or of a GQA group's heads packed (two blocks of 16 rows); the 4 warps of a row block each
// take a quarter of the key channels for Q K^T (144: 9 k blocks, the Q fragments in registers) and
// a quarter of the value channels for P V (128), and sum their quarters of the scores through
// shared memory in one order, so that all 4 hold the same scores, maxima and sums. Each 64-key tile
// is dequantized once into shared memory (rows of 576 + 8 halves) and serves both products: the
// values are its first 512 channels. Values in rows of their own are dequantized over the tile's
// first 512 channels once Q K^T has read it (the same shared memory; one more barrier a tile).
namespace tcl {
constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kRows = 32;                // query tokens per CTA
constexpr int kPieces = 4;               // warps per 16-row block
constexpr int kKeys = cuda::tc::kKeys;   // keys per tile
constexpr int kD = kLatentD, kDv = kLatentDv;
constexpr int kLd = kD + cuda::tc::kPad;  // Q and K rows (16-bit elements; 16-byte padding)
constexpr int kQkCh = kD / kPieces;       // a warp's key channels (9 k blocks)
constexpr int kPvCh = kDv / kPieces;      // a warp's value channels
// Shared memory (byte offsets): Q (hi; once its fragments are in registers, the score exchange
// [warp][8-key block][lane] as float4), the key tile, for fp32 queries Q_lo and the rows' score
// factors.
constexpr size_t kQBytes = size_t(kRows) * kLd * 2;
constexpr size_t kXBytes = size_t(kWarps) * 8 * 32 * 16;
constexpr size_t kK = ((kQBytes > kXBytes ? kQBytes : kXBytes) + 127) / 128 * 128;
constexpr size_t kQLo = kK + size_t(kKeys) * kLd * 2;
constexpr size_t kRowScale = kQLo + kQBytes;
constexpr size_t bytes(bool split) { return split ? kRowScale + kRows * sizeof(float) : kQLo; }
static_assert(kQLo % 128 == 0 && kRowScale % 16 == 0, "aligned regions");
}  // namespace tcl

// Values that are the key rows' first channels: v = k with the key rows' stride and scales (multi-head
// latent attention's latent read in place).
__device__ __forceinline__ bool values_in_key_rows(const DecodeParams& p) {
  return static_cast<const void*>(p.v) == static_cast<const void*>(p.k) &&
         static_cast<const void*>(p.v_scale) == static_cast<const void*>(p.k_scale) && value_row(p) == p.d / 2 &&
         value_scale_row(p) == p.d / p.group;
}

// CTA (32 query rows of `pack` heads (PackedRows), batch row); query token i is cache token
// first + i and sees cache tokens start .. first + i (as prefill_tc_kernel). kSplit: fp32 queries
// (T = __half; Q and P as hi + lo parts, the Q K^T lo products skipped when no row of the CTA needs
// them). kPaged: a paged cache.
template <typename T, bool kSplit, bool kPaged>
__global__ void __launch_bounds__(tcl::kThreads) prefill_latent_tc_kernel(const PrefillTcArgs args) {
  using tcl::kD;
  using tcl::kDv;
  using tcl::kKeys;
  using tcl::kLd;
  using tcl::kRows;
  constexpr int kKb = tcl::kQkCh / 16, kNb = tcl::kPvCh / 8;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  T* sq = reinterpret_cast<T*>(tc_smem);
  auto& sx = *reinterpret_cast<float4(*)[tcl::kWarps][8][32]>(tc_smem);  // (aliases Q)
  T* sk = reinterpret_cast<T*>(tc_smem + tcl::kK);
  const T* sq_lo = reinterpret_cast<const T*>(tc_smem + tcl::kQLo);  // (kSplit)

  const DecodeParams& p = args.p;
  const int r0 = static_cast<int>(blockIdx.x) * kRows;
  const int64_t b = blockIdx.z;
  const PackedRows mine(static_cast<int>(blockIdx.y) * args.pack, r0, args.pack);
  const int64_t kh = mine.h0 / (p.hq / p.hkv);
  const int64_t rows = tile_query_rows<kRows, kDv>(p, b, mine, r0);  // (q_lens: padding written)
  if (rows == 0) return;  // (the whole CTA)
  const int64_t first = end_token(p, b) - query_count(p, b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int rb = warp / tcl::kPieces, piece = warp % tcl::kPieces;  // the warp's rows and channels
  // (the key tile's first row's padding: Q's is the score exchange's)
  const PackedRows& q_at = in_pad(tc_smem + tcl::kK + tcl::kD * 2, mine);

  bool use_lo = false;
  float rs[2] = {1.0f, 1.0f};  // rows g, g + 8 of the block: their scores' factors
  if constexpr (kSplit) {
    auto* lo = reinterpret_cast<__half*>(tc_smem + tcl::kQLo);
    auto* rsm = reinterpret_cast<float*>(tc_smem + tcl::kRowScale);
    constexpr int kPerWarp = kRows / tcl::kWarps;
    const auto row_ptr = [&](int r) { return p.q + mine.row(p, b, r) * kD; };
    const bool lo_needed = load_split_rows<kD>(row_ptr, rows, warp * kPerWarp, kPerWarp, reinterpret_cast<__half*>(sq),
                                               lo, rsm, kLd);
    use_lo = __syncthreads_or(lo_needed);
    rs[0] = rsm[rb * 16 + g];
    rs[1] = rsm[rb * 16 + g + 8];
  } else {
    const T* q = static_cast<const T*>(p.q16);
    cuda::tc::load_rows_async<T, kD>(sq, kLd, kRows, static_cast<int>(rows),
                                     [&](int i) { return q + mine.row(p, b, i) * kD; });
    cuda::ptx::cp_async_commit();
    cuda::ptx::cp_async_wait<0>();
    __syncthreads();
  }
  // The warp's Q fragments (rows 0-7 / 8-15 in lanes 0-15, then channels + 8), its key channels.
  const int qoff = (rb * 16 + (lane & 15)) * kLd + (lane >> 4) * 8 + piece * tcl::kQkCh;
  uint32_t qf[kKb][4];
#pragma unroll
  for (int kk = 0; kk < kKb; ++kk) cuda::ptx::ldmatrix_x4(qf[kk], sq + qoff + kk * 16);

  const auto at = cache_rows<kPaged>(p, b, kh);
  const int64_t last_key = first + mine.token(static_cast<int>(rows) - 1);  // the CTA's last visible cache token
  const int64_t start = first_token(p, b);
  const TileRows keys{p.k, kD / 2, reinterpret_cast<const uint8_t*>(p.k_scale), kD / p.group,
                      static_cast<int>(p.group)};
  const TileRows values{p.v, value_row(p), reinterpret_cast<const uint8_t*>(p.v_scale), value_scale_row(p),
                        static_cast<int>(p.group)};
  const bool own_values = !values_in_key_rows(p);  // (CTA-uniform)
  // Tiles of one ldmatrix: keys +0-7 channels +0 / +8 (b[0], b[1] of block nb), keys +8-15 (nb + 1).
  const T* krow = sk + ((lane >> 4) * 8 + (lane & 7)) * kLd + ((lane >> 3) & 1) * 8 + piece * tcl::kQkCh;
  float o[kNb][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nb][e] = 0.0f;
  }
  for (int64_t t0 = start / kKeys * kKeys; t0 <= last_key; t0 += kKeys) {
    const int64_t nt = last_key + 1 - t0 < kKeys ? last_key + 1 - t0 : kKeys;
    __syncthreads();  // the previous tile and the exchange are consumed (first: Q's fragments loaded)
    // The tile's keys dequantized into shared memory (zeros past nt and before start), 6 words of a
    // thread's in flight at a time (registers: the Q fragments and O stay live).
    dequantize_tile<T, kD, tcl::kThreads, 6>(keys, at, t0, nt, start, sk, kLd);
    __syncthreads();

    // The warp's quarter of S = Q K^T: 16 rows x 64 keys over its 144 key channels.
    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kKb; ++kk) {
      uint32_t qlo[4];  // kSplit: Q_lo's fragment (read when used: CTA-uniform)
      if (kSplit && use_lo) cuda::ptx::ldmatrix_x4(qlo, sq_lo + qoff + kk * 16);
#pragma unroll
      for (int nb = 0; nb < 8; nb += 2) {
        uint32_t kf[4];
        cuda::ptx::ldmatrix_x4(kf, krow + nb * 8 * kLd + kk * 16);
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        cuda::ptx::mma_16816<T>(s[nb], qf[kk], b0);
        cuda::ptx::mma_16816<T>(s[nb + 1], qf[kk], b1);
        if (kSplit && use_lo) {
          cuda::ptx::mma_16816<T>(s[nb], qlo, b0);
          cuda::ptx::mma_16816<T>(s[nb + 1], qlo, b1);
        }
      }
    }
    // The row block's quarters summed in one order (the same in its 4 warps).
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) sx[warp][nb][lane] = make_float4(s[nb][0], s[nb][1], s[nb][2], s[nb][3]);
    __syncthreads();  // (and every warp's Q K^T has read the key tile)
    if (own_values) {  // the tile's values over its first kDv channels (zeros where the keys have them)
      dequantize_tile<T, kDv, tcl::kThreads, 4>(values, at, t0, nt, start, sk, kLd);
    }
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
      float4 y = sx[rb * tcl::kPieces][nb][lane];
#pragma unroll
      for (int w = 1; w < tcl::kPieces; ++w) {
        const float4 z = sx[rb * tcl::kPieces + w][nb][lane];
        y.x += z.x, y.y += z.y, y.z += z.z, y.w += z.w;
      }
      s[nb][0] = y.x, s[nb][1] = y.y, s[nb][2] = y.z, s[nb][3] = y.w;
    }

    // Online softmax in base 2 (masked: rows past `rows`, keys before start or after the row's,
    // first + q_at.token(i); q_at's fields read from shared memory).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rb * 16 + g + 8 * (e >> 1);
        const int64_t key = t0 + nb * 8 + 2 * tq + (e & 1);
        const float x = softcapped(s[nb][e] * p.scale * rs[e >> 1], p.softcap);
        s[nb][e] = i < rows && key >= start && key <= first + q_at.token(i) ? cuda::tc::visible_score(x) : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nb][e]);
      }
    }
    float alpha[2];
    cuda::tc::online_max_step(mx, m, l, alpha);
#pragma unroll
    for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nb][e] *= alpha[e >> 1];
    }
    cuda::tc::scores_to_p(s, m, l);
    uint32_t pf[kKeys / 16][4];
    cuda::tc::to_a_fragments<T>(s, pf);
    if (own_values) __syncthreads();  // (the values stored)
    // O += P V over the warp's 128 value channels: the tile's rows, channels 128 piece ..
    cuda::tc::mma_ab<T, kKeys / 16, kNb>(o, pf, sk + piece * tcl::kPvCh, kLd);
    if constexpr (kSplit) {  // and the lo parts of P
      uint32_t plo[kKeys / 16][4];
      cuda::tc::lo_fragments<T>(s, pf, plo);
      cuda::tc::mma_ab<T, kKeys / 16, kNb>(o, plo, sk + piece * tcl::kPvCh, kLd);
    }
  }

  // O / l of the warp's rows and value channels; the rows' lse from the first warp of the block.
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float sum = l[hh];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int i = rb * 16 + g + 8 * hh;
    if (i >= rows) continue;
    const float inv = seen(sum) ? 1.0f / sum : 0.0f;
    const int64_t w = q_at.row(p, blockIdx.z, i);
    float* out = p.out + w * kDv + piece * tcl::kPvCh;
#pragma unroll
    for (int nb = 0; nb < kNb; ++nb) {
      out[nb * 8 + 2 * tq] = o[nb][2 * hh] * inv;
      out[nb * 8 + 2 * tq + 1] = o[nb][2 * hh + 1] * inv;
    }
    if (piece == 0 && tq == 0) p.lse[w] = seen(sum) ? (m[hh] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
  }
}

template <typename T, bool kSplit, bool kPaged>
Status prefill_latent_tc(const DecodeParams& p, cudaStream_t stream) {
  static bool configured[64] = {};
  const auto kernel = prefill_latent_tc_kernel<T, kSplit, kPaged>;
  if (Status s = cuda::tc::opt_in(kernel, tcl::bytes(kSplit), configured); !s.is_ok()) return s;
  const PrefillTcArgs args{p, prefill_pack(p, tcl::kRows)};
  const dim3 grid = prefill_grid(args, tcl::kRows);
  prefill_latent_tc_kernel<T, kSplit, kPaged><<<grid, tcl::kThreads, tcl::bytes(kSplit), stream>>>(args);
  return cuda::last_launch_status();
}

template <typename T, bool kSplit>
Status prefill_latent_tc(const DecodeParams& p, cudaStream_t stream) {
  return p.block_table != nullptr ? prefill_latent_tc<T, kSplit, true>(p, stream)
                                  : prefill_latent_tc<T, kSplit, false>(p, stream);
}

// Multi-head latent attention's 576 / 512 (the values in the key rows or in rows of their own),
// prefill_tc_queries_ok, and the shared memory fits.
bool prefill_latent_tc_ok(const DecodeParams& p) {
  if (p.d != kLatentD || value_dim(p) != kLatentDv) return false;
  if (!cuda::is_aligned(p.v, 4) || value_row(p) % 4 != 0) return false;  // (rows read 4 bytes at a time)
  return prefill_tc_queries_ok(p) && cuda::tc::optin_smem(nullptr) >= tcl::bytes(p.q16 == nullptr);
}

Status prefill_latent_tc_dispatch(const DecodeParams& p, cudaStream_t stream) {
  if (p.q16 == nullptr) return prefill_latent_tc<__half, true>(p, stream);
  if (p.q16_dtype == DType::kFloat16) return prefill_latent_tc<__half, false>(p, stream);
  return prefill_latent_tc<__nv_bfloat16, false>(p, stream);
}

template <int D, int DV>
size_t prefill_tc_smem(bool split) {
  return split ? prefill_tc_smem<D, DV, true>() : prefill_tc_smem<D, DV, false>();
}

// The tile's shapes (cuda::tc::with_dims: head_dim 64, 80, 96, 128 or 256 with values as wide, or
// keys of 192 with values of 128); fp16/bf16 queries given (q16, 16-byte aligned) or fp32 ones (the
// hi + lo kernel); grid and shared memory fit.
bool prefill_tc_ok(const DecodeParams& p) {
  // cache rows read 4 bytes at a time
  if (!prefill_tc_queries_ok(p) || !cuda::is_aligned(p.v, 4) || value_row(p) % 4 != 0) return false;
  const bool split = p.q16 == nullptr;
  const size_t need = cuda::tc::with_dims(p.d, value_dim(p), size_t{0}, [&](auto dims) {
    return prefill_tc_smem<decltype(dims)::kD, decltype(dims)::kDV>(split);
  });
  return need > 0 && cuda::tc::optin_smem(nullptr) >= need;
}

template <typename T, bool kSplit>
Status prefill_tc_by_dim(const DecodeParams& p, cudaStream_t stream) {
  return cuda::tc::with_dims(p.d, value_dim(p), Status::unsupported("int4_kv_attention: not a tile shape"),
                             [&](auto dims) {
                               constexpr int D = decltype(dims)::kD, DV = decltype(dims)::kDV;
                               return p.block_table != nullptr ? prefill_tc<T, D, DV, kSplit, true>(p, stream)
                                                               : prefill_tc<T, D, DV, kSplit, false>(p, stream);
                             });
}

Status prefill_tc_dispatch(const DecodeParams& p, cudaStream_t stream) {
  if (p.q16 == nullptr) return prefill_tc_by_dim<__half, true>(p, stream);
  if (p.q16_dtype == DType::kFloat16) return prefill_tc_by_dim<__half, false>(p, stream);
  return prefill_tc_by_dim<__nv_bfloat16, false>(p, stream);
}

// ---- Tensor-core decode -----------------------------------------------------------------------
// One query token per row, keys and values of head_dim D = 64, 128 or 256, quantization groups a
// multiple of 16 channels. The GQA group's query heads are the 16 rows of mma.sync m16n8k16 (fp16 inputs,
// fp32 accumulation; a larger group in slices of 16, a smaller one padded with zero rows). The cache
// bytes go from global memory straight into registers, are dequantized there (a nibble times an FP8
// scale is exact in fp16) and used as the B fragments; nothing of K or V passes through shared
// memory. The mma's k index (channels in Q K^T, keys in P V) and the output's columns are permuted
// so that each lane's bytes are contiguous in the cache rows (g = lane / 4, t = lane % 4):
//   Q K^T: lane (g, t) holds key g of each 8-key block, channels [t D / 4, (t + 1) D / 4) (one
//     D / 8-byte load per key); k block kk is its word kk / 2, nibbles (j, j + 4) as one fp16 pair,
//     j = 2 (kk % 2) for k (2t, 2t + 1) and j + 1 for (2t + 8, 2t + 9). The Q fragments, built once
//     per CTA in shared memory, follow the same order.
//   P V: lane (g, t) holds channels [g D / 8, (g + 1) D / 8) (D / 16 bytes) of keys 2t, 2t + 1,
//     2t + 8 and 2t + 9 of each 16-key block; output block nb, column n is channel n D / 8 + nb, so
//     lane (g, t) ends holding channels [t D / 4, (t + 1) D / 4) of rows g and g + 8.
// fp32 queries (kSplit): Q = Q_hi + Q_lo and P = P_hi + P_lo in fp16, two products each, so the
// scores and the output keep about 22 bits (the fp32 kernel's tolerances); 16-bit queries: one each
// (P rounded to fp16, as FlashAttention rounds P to the input dtype). Each query row is first scaled
// by a power of two that puts its max in [2^14, 2^15) (inside fp16's range; the lo parts clear of
// its subnormals), undone in the row's softmax scale.
// Work split as decode_split_kernel (same workspace and combine kernel): grid (batch * kv heads *
// slices, splits); the CTA's 4 warps take 32-key steps of its split round-robin, each loading its
// next step's bytes before the current step's products, and merge in shared memory.
// Values of more than 128 channels (the output's blocks of 8 channels would take 128 fp32 registers
// a lane at 256): the warps work in groups of G = dv / 128 (pairs at head_dim 256; all 4 for multi-
// head latent attention's 512-channel latent), each group one 32-key step at a time, each warp of
// it one G-th of the value channels and of the key channels below dv (DH = 128, the layouts above
// with D = DH, its bytes from channel 128 h of the rows); key channels past dv (the 64-channel RoPE
// part of the latent, or of keys of 192 with values of 128: there G = 1) go to the group's first
// warp, in the 64-channel layout. Each warp forms its part of Q K^T, the group sums the parts
// through shared memory in one order (block barriers per step: every warp runs the same number of
// steps, a group past the split's end idling), so all of its warps hold the same scores, maxima and
// sums, and each accumulates its part of P V.
namespace tcd {
constexpr int kWarps = 4;
constexpr int kRows = 16;  // query heads per CTA
constexpr int kStep = 32;  // keys per warp step
}  // namespace tcd

// A lane's key bytes of a warp step for DH channels of the rows (see above), and their group-scale
// codes.
template <int DH>
struct DecodeKeyBytes {
  static constexpr int kKWords = DH / 32, kKCodes = DH / 64;
  uint32_t k[4][kKWords];   // keys 8 nb + g of the step (nb = 0..3)
  uint32_t kc[4][kKCodes];  // the code of channels t DH / 4 + 16 j .. + 15 of key 8 nb + g
};

// And the value bytes too: a warp's whole step.
template <int DH>
struct DecodeStepBytes : DecodeKeyBytes<DH> {
  static constexpr int kVWords = DH / 64;
  uint32_t v[2][4][kVWords];  // 16-key block kk: keys 2t, 2t + 1, 2t + 8, 2t + 9
  uint32_t vc[2][4];          // the code of the value channels of each of those keys
};

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* src, uint32_t (&w)[N]) {
  if constexpr (N == 4) {
    const uint4 x = *reinterpret_cast<const uint4*>(src);
    w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
  } else if constexpr (N == 2) {
    const uint2 x = *reinterpret_cast<const uint2*>(src);
    w[0] = x.x, w[1] = x.y;
  } else {
    static_assert(N == 1, "1, 2 or 4 words");
    w[0] = *reinterpret_cast<const uint32_t*>(src);
  }
}

// Where this lane's scale codes sit in a row of them (the same for every key), for the DH channels
// from c0 (the warp's part of a row, or all of it).
template <int DH>
struct DecodeCodeAt {
  int k[DH / 64], v;
  __device__ DecodeCodeAt(int g, int t, int group, int c0) {
#pragma unroll
    for (int j = 0; j < DH / 64; ++j) k[j] = (c0 + t * (DH / 4) + 16 * j) / group;
    v = (c0 + g * (DH / 8)) / group;
  }
};

// The key bytes of the step of keys t .. t + 31 (those at or past t1 zero: they dequantize to 0):
// of rows of D channels, the DH channels from c0.
template <int D, int DH>
__device__ __forceinline__ void fetch_decode_keys(const DecodeParams& p, const TokenRows& rows, int64_t t, int64_t t1,
                                                  int c0, const DecodeCodeAt<DH>& at, DecodeKeyBytes<DH>& r) {
  using R = DecodeKeyBytes<DH>;
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int64_t ng = D / p.group;
  const auto* ks8 = reinterpret_cast<const uint8_t*>(p.k_scale);
#pragma unroll
  for (int nb = 0; nb < 4; ++nb) {
    const int64_t tok = t + 8 * nb + g;
    if (tok < t1) {
      const int64_t row = rows(tok);
      load_words<R::kKWords>(p.k + row * (D / 2) + c0 / 2 + tq * (DH / 8), r.k[nb]);
#pragma unroll
      for (int j = 0; j < R::kKCodes; ++j) r.kc[nb][j] = ks8[row * ng + at.k[j]];
    } else {
#pragma unroll
      for (int w = 0; w < R::kKWords; ++w) r.k[nb][w] = 0u;
#pragma unroll
      for (int j = 0; j < R::kKCodes; ++j) r.kc[nb][j] = 0u;
    }
  }
}

// The whole step: keys as above, and the values' DH channels from c0.
template <int D, int DH>
__device__ __forceinline__ void fetch_decode_step(const DecodeParams& p, const TokenRows& rows, int64_t t, int64_t t1,
                                                  int c0, const DecodeCodeAt<DH>& at, DecodeStepBytes<DH>& r) {
  using R = DecodeStepBytes<DH>;
  fetch_decode_keys<D, DH>(p, rows, t, t1, c0, at, r);
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int64_t v_row = value_row(p), vs_row = value_scale_row(p);
  const auto* vs8 = reinterpret_cast<const uint8_t*>(p.v_scale);
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t tok = t + 16 * kk + 2 * tq + (i & 1) + 8 * (i >> 1);
      if (tok < t1) {
        const int64_t row = rows(tok);
        load_words<R::kVWords>(p.v + row * v_row + c0 / 2 + g * (DH / 16), r.v[kk][i]);
        r.vc[kk][i] = vs8[row * vs_row + at.v];
      } else {
#pragma unroll
        for (int w = 0; w < R::kVWords; ++w) r.v[kk][i][w] = 0u;
        r.vc[kk][i] = 0u;
      }
    }
  }
}

// s += Q K^T over the DH channels of `keys` (their bytes; consumed), Q's fragments of those channels
// at k blocks kk0 .. kk0 + DH / 16 - 1 of sq.
template <int DH, int kParts, int kKb>
__device__ __forceinline__ void add_decode_scores(float (&s)[4][4], const uint32_t (&sq)[kParts][kKb][32][4],
                                                  DecodeKeyBytes<DH>& keys, int kk0, int q_parts) {
  using R = DecodeKeyBytes<DH>;
  const int lane = threadIdx.x & 31;
  uint32_t ks2[4][R::kKCodes];
#pragma unroll
  for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
    for (int j = 0; j < R::kKCodes; ++j) {
      const float sc = fp8e4m3_value(static_cast<uint8_t>(keys.kc[nb][j]));
      ks2[nb][j] = cuda::ptx::pack2<__half>(sc, sc);
    }
#pragma unroll
    for (int w = 0; w < R::kKWords; ++w) keys.k[nb][w] ^= 0x88888888u;  // offset binary
  }
#pragma unroll
  for (int kk = 0; kk < DH / 16; ++kk) {
    uint32_t a[kParts][4];
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const uint4 x = *reinterpret_cast<const uint4*>(sq[part][kk0 + kk][lane]);
      a[part][0] = x.x, a[part][1] = x.y, a[part][2] = x.z, a[part][3] = x.w;
    }
    const int j = 4 * 2 * (kk % 2);  // the bit offset of nibble 2 (kk % 2)
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
      const uint32_t w = keys.k[nb][kk / 2], sc = ks2[nb][kk / 4];
      const uint32_t bf[2] = {cuda::ptx::i4x2_f16x2((w >> j) & 0x000F000Fu, sc),
                              cuda::ptx::i4x2_f16x2((w >> (j + 4)) & 0x000F000Fu, sc)};
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        if (part < q_parts) cuda::ptx::mma_16816<__half>(s[nb], a[part], bf);
      }
    }
  }
}

template <int D, bool kSplit>
__device__ __forceinline__ float decode_query_at(const DecodeParams& p, int64_t qh, int c) {
  if constexpr (kSplit) {
    return p.q[qh * D + c];
  } else if (p.q16_dtype == DType::kFloat16) {
    return to_f(static_cast<const __half*>(p.q16)[qh * D + c]);
  } else {
    return to_f(static_cast<const __nv_bfloat16*>(p.q16)[qh * D + c]);
  }
}

template <int D, int DV, bool kSplit>
__global__ void __launch_bounds__(tcd::kWarps * 32) decode_tc_kernel(const DecodeParams p, int64_t chunk,
                                                                     int64_t splits, float* part_out,
                                                                     float* part_lse) {
  using tcd::kRows;
  using tcd::kStep;
  using tcd::kWarps;
  // Values of more than 128 channels: G warps take each key step together, each G-th of the value
  // channels (DH) and of the key channels below DV; the key channels past DV (multi-head latent
  // attention's RoPE part, KX) go to the group's first warp (see above).
  constexpr int G = DV > 128 ? DV / 128 : 1, DH = DV / G, KX = D - DV, kStreams = kWarps / G;
  constexpr int kKb = D / 16, kKbH = DH / 16, kNb = DH / 8, kParts = kSplit ? 2 : 1;
  static_assert(DV % G == 0 && DH % 64 == 0 && KX % 64 == 0 && kWarps % G == 0, "decode_tc_ok's shapes");
  // Shared memory: the Q fragments (hi, lo) and, with G > 1, the groups' score exchange (two buffers
  // and one barrier per step for pairs; one buffer and two barriers for groups of 4, to stay within
  // the 48 KiB of static shared memory) during the key loop; the warps' outputs for the merge after
  // it (in the same bytes with G > 1, where both would not fit).
  constexpr int kSxBufs = G > 2 ? 1 : 2;
  constexpr int kSqBytes = kParts * kKb * 32 * 16, kSxBytes = G > 1 ? kSxBufs * kWarps * 4 * 32 * 16 : 0;
  constexpr int kLoopBytes = kSqBytes + kSxBytes, kSoBytes = kWarps * kRows * DH * 4;
  constexpr int kSoAt = G > 1 ? 0 : kLoopBytes;
  __shared__ __align__(16) unsigned char smem[kSoAt + kSoBytes > kLoopBytes ? kSoAt + kSoBytes : kLoopBytes];
  auto& sq = *reinterpret_cast<uint32_t(*)[kParts][kKb][32][4]>(smem);
  auto& sx = *reinterpret_cast<float4(*)[kSxBufs][kWarps][4][32]>(smem + kSqBytes);  // (G > 1 only)
  auto& so = *reinterpret_cast<float(*)[kWarps][kRows][DH]>(smem + kSoAt);
  __shared__ float srow_f[kRows];      // the rows' factors
  __shared__ float srow_scale[kRows];  // and score scales
  __shared__ float sm[kWarps][kRows];  // the warps' maxima
  __shared__ float sl[kWarps][kRows];  // and sums

  const int64_t group_heads = p.hq / p.hkv, slices = (group_heads + kRows - 1) / kRows;
  const int64_t bk = blockIdx.x / slices, split = blockIdx.y;
  const int64_t b = bk / p.hkv, kh = bk % p.hkv, h0 = (blockIdx.x % slices) * kRows;
  const int gh = static_cast<int>(group_heads - h0 < kRows ? group_heads - h0 : kRows);
  const int64_t qh0 = b * p.hq + kh * group_heads + h0;  // the CTA's first [batch * hq] row
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int piece = warp % G, stream = warp / G;  // the warp's piece of the channels, its key steps

  {  // each row's max |q| (8 threads per row), its factor f and score scale p.scale / f
    const int row = threadIdx.x >> 3, sub = threadIdx.x & 7;
    float mx = 0.0f;
    if (row < gh) {
      for (int c = sub * (D / 8); c < (sub + 1) * (D / 8); ++c) {
        mx = fmaxf(mx, fabsf(decode_query_at<D, kSplit>(p, qh0 + row, c)));
      }
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float f = 1.0f;
    if constexpr (kSplit) {
      f = fp32_query_factor(mx);
    } else if (mx > 0.0f && mx <= 3.402823466e38f) {  // 16-bit values stay exact: a power of two
      const int e = 14 - ilogbf(mx);
      f = pow2f(e < 126 ? e : 126);
    }
    if (sub == 0) {
      srow_f[row] = f;
      srow_scale[row] = p.scale / f;
    }
  }
  __syncthreads();
  bool lo_needed = false;  // a lo part above kQueryLoLimit
  // The A fragments: the G parts' k blocks one after the other, then the KX channels'.
  for (int i = threadIdx.x; i < kKb * 32 * 4; i += blockDim.x) {
    const int kk = i / 128, l = (i / 4) % 32, r = i % 4, row = (l >> 2) + 8 * (r & 1);
    const bool extra = kk >= G * kKbH;  // (KX > 0 only)
    const int dh = extra ? KX : DH, c0 = extra ? DV : kk / kKbH * DH, k = extra ? kk - G * kKbH : kk % kKbH;
    const int c = c0 + (l & 3) * (dh / 4) + 8 * (k / 2) + 2 * (k % 2) + (r >> 1);
    float x0 = 0.0f, x1 = 0.0f;
    if (row < gh) {
      x0 = decode_query_at<D, kSplit>(p, qh0 + row, c) * srow_f[row];
      x1 = decode_query_at<D, kSplit>(p, qh0 + row, c + 4) * srow_f[row];
    }
    const uint32_t hi = cuda::ptx::pack2<__half>(x0, x1);
    sq[0][kk][l][r] = hi;
    if constexpr (kSplit) {
      float h0f, h1f;
      cuda::ptx::unpack2<__half>(hi, h0f, h1f);
      sq[kParts - 1][kk][l][r] = cuda::ptx::pack2<__half>(x0 - h0f, x1 - h1f);
      lo_needed = lo_needed || fabsf(x0 - h0f) > kQueryLoLimit || fabsf(x1 - h1f) > kQueryLoLimit;
    }
  }
  // The Q K^T products of the lo parts, when some row needs them (one flag for the CTA).
  const int q_parts = __syncthreads_or(lo_needed) ? kParts : 1;

  const float row_scale[2] = {srow_scale[g], srow_scale[g + 8]};
  const int64_t first = first_token(p, b);  // (left padding skipped)
  const int64_t t0 = split * chunk > first ? split * chunk : first;
  const int64_t end = end_token(p, b);
  const int64_t t1 = split * chunk + chunk < end ? split * chunk + chunk : end;
  const TokenRows rows = token_rows(p, b, kh);
  const DecodeCodeAt<DH> at(g, tq, static_cast<int>(p.group), piece * DH);
  const DecodeCodeAt<(KX > 0 ? KX : 64)> atx(g, tq, static_cast<int>(p.group), DV);  // (KX > 0 only)
  const bool has_extra = KX > 0 && piece == 0;  // (warp-uniform)

  float o[kNb][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nb][e] = 0.0f;
  }
  DecodeStepBytes<DH> next;
  DecodeKeyBytes<(KX > 0 ? KX : 64)> xnext;  // (KX > 0 only)
  int64_t t = t0 + stream * kStep;
  if (t < t1) {
    fetch_decode_step<D, DH>(p, rows, t, t1, piece * DH, at, next);
    if constexpr (KX > 0) {
      if (has_extra) fetch_decode_keys<D, KX>(p, rows, t, t1, DV, atx, xnext);
    }
  }
  // The same number of iterations in every warp (the groups' barriers); a stream past t1 idles.
  const int64_t iters = t1 > t0 ? (t1 - t0 + kStreams * kStep - 1) / (kStreams * kStep) : 0;
  for (int64_t it = 0; it < iters; ++it, t += kStreams * kStep) {
    const bool active = t < t1;
    // S = Q K^T over the warp's channels: 4 blocks of 8 keys.
    float s[4][4];
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
    }
    DecodeStepBytes<DH> cur = next;
    if (active) {
      if constexpr (KX > 0) {
        if (has_extra) {
          DecodeKeyBytes<KX> xcur = xnext;
          if (t + kStreams * kStep < t1) fetch_decode_keys<D, KX>(p, rows, t + kStreams * kStep, t1, DV, atx, xnext);
          add_decode_scores<KX, kParts, kKb>(s, sq, xcur, G * kKbH, q_parts);
        }
      }
      if (t + kStreams * kStep < t1) fetch_decode_step<D, DH>(p, rows, t + kStreams * kStep, t1, piece * DH, at, next);
      add_decode_scores<DH, kParts, kKb>(s, sq, cur, piece * kKbH, q_parts);
    }
    if constexpr (G > 1) {  // the group's parts of the scores, summed in one order (the same in each warp)
      auto& buf = sx[kSxBufs > 1 ? it & 1 : 0];
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) buf[warp][nb][lane] = make_float4(s[nb][0], s[nb][1], s[nb][2], s[nb][3]);
      __syncthreads();
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
        float4 y = buf[stream * G][nb][lane];
#pragma unroll
        for (int w = 1; w < G; ++w) {
          const float4 z = buf[stream * G + w][nb][lane];
          y.x += z.x, y.y += z.y, y.z += z.z, y.w += z.w;
        }
        s[nb][0] = y.x, s[nb][1] = y.y, s[nb][2] = y.z, s[nb][3] = y.w;
      }
      if constexpr (kSxBufs == 1) __syncthreads();  // (the buffer is written again next step)
    }
    if (!active) continue;

    // Online softmax in base 2 (the keys past t1 masked).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = softcapped(s[nb][e] * row_scale[e >> 1], p.softcap);
        x = t + 8 * nb + 2 * tq + (e & 1) < t1 ? cuda::tc::visible_score(x) : -INFINITY;
        s[nb][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2];
    cuda::tc::online_max_step(mx, m, l, alpha);
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {  // (rare once the max settles)
#pragma unroll
      for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nb][e] *= alpha[e >> 1];
      }
    }
    cuda::tc::scores_to_p(s, m, l);

    // O += P V over the warp's value channels: 2 blocks of 16 keys.
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t pf[kParts][4];
      pf[0][0] = cuda::ptx::pack2<__half>(s[2 * kk][0], s[2 * kk][1]);
      pf[0][1] = cuda::ptx::pack2<__half>(s[2 * kk][2], s[2 * kk][3]);
      pf[0][2] = cuda::ptx::pack2<__half>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[0][3] = cuda::ptx::pack2<__half>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      if constexpr (kSplit) {
        const float* src[4] = {&s[2 * kk][0], &s[2 * kk][2], &s[2 * kk + 1][0], &s[2 * kk + 1][2]};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float h0f, h1f;
          cuda::ptx::unpack2<__half>(pf[0][r], h0f, h1f);
          pf[kParts - 1][r] = cuda::ptx::pack2<__half>(src[r][0] - h0f, src[r][1] - h1f);
        }
      }
      const uint32_t s01 = cuda::ptx::pack2<__half>(fp8e4m3_value(static_cast<uint8_t>(cur.vc[kk][0])),
                                                    fp8e4m3_value(static_cast<uint8_t>(cur.vc[kk][1])));
      const uint32_t s89 = cuda::ptx::pack2<__half>(fp8e4m3_value(static_cast<uint8_t>(cur.vc[kk][2])),
                                                    fp8e4m3_value(static_cast<uint8_t>(cur.vc[kk][3])));
#pragma unroll
      for (int i = 0; i < DH / 16; ++i) {  // byte i of the lane's value bytes: channels 2i, 2i + 1
        const uint32_t sel = static_cast<uint32_t>(i % 4) | static_cast<uint32_t>(4 + i % 4) << 8;
        const uint32_t x01 = cuda::ptx::prmt(cur.v[kk][0][i / 4], cur.v[kk][1][i / 4], sel) ^ 0x00880088u;
        const uint32_t x89 = cuda::ptx::prmt(cur.v[kk][2][i / 4], cur.v[kk][3][i / 4], sel) ^ 0x00880088u;
        const uint32_t lo[2] = {cuda::ptx::i4x2_f16x2(x01 & 0x000F000Fu, s01),
                                cuda::ptx::i4x2_f16x2(x89 & 0x000F000Fu, s89)};
        const uint32_t hi[2] = {cuda::ptx::i4x2_f16x2((x01 >> 4) & 0x000F000Fu, s01),
                                cuda::ptx::i4x2_f16x2((x89 >> 4) & 0x000F000Fu, s89)};
#pragma unroll
        for (int part = 0; part < kParts; ++part) {
          cuda::ptx::mma_16816<__half>(o[2 * i], pf[part], lo);
          cuda::ptx::mma_16816<__half>(o[2 * i + 1], pf[part], hi);
        }
      }
    }
  }

  // Merge the streams (as decode_split_kernel; maxima in base 2); the warps of a group hold the
  // same maxima and sums.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    if (tq == 0) {
      sm[warp][g + 8 * h] = m[h];
      sl[warp][g + 8 * h] = l[h];
    }
  }
  if constexpr (G > 1) __syncthreads();  // (so overwrites sq and sx)
#pragma unroll
  for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) so[warp][g + 8 * (e >> 1)][(2 * tq + (e & 1)) * (DH / 8) + nb] = o[nb][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < gh * DV; i += blockDim.x) {
    const int h = i / DV, c = i % DV, w0 = c / DH, cw = c % DH;  // (warps w0, w0 + G, ...: its streams)
    RowMax row;
    for (int w = w0; w < kWarps; w += G) row.add(sm[w][h], sl[w][h]);
    float sum = row.zero(), out = row.zero();
    if (row.weigh()) {
      for (int w = w0; w < kWarps; w += G) {
        if (sm[w][h] == -INFINITY) continue;
        const float f = exp2f(sm[w][h] - row.mx);
        sum += sl[w][h] * f;
        out += so[w][h][cw] * f;
      }
    }
    const int64_t qh = qh0 + h;
    part_out[(qh * splits + split) * DV + c] = seen(sum) ? out / sum : 0.0f;
    if (c == 0) {
      part_lse[qh * splits + split] = seen(sum) ? (row.mx + log2f(sum)) * 0.6931471805599453f : -INFINITY;
    }
  }
}

template <int D, int DV, bool kSplit>
Status decode_tc(const DecodeParams& p, cudaStream_t stream) {
  const SplitPlan plan = split_plan(p.length, p.splits);
  float* part_out = p.workspace;
  float* part_lse = p.workspace + p.batch * p.hq * plan.splits * DV;
  const int64_t slices = (p.hq / p.hkv + tcd::kRows - 1) / tcd::kRows;
  const dim3 grid(static_cast<unsigned>(p.batch * p.hkv * slices), static_cast<unsigned>(plan.splits));
  decode_tc_kernel<D, DV, kSplit><<<grid, tcd::kWarps * 32, 0, stream>>>(p, plan.chunk, plan.splits, part_out,
                                                                          part_lse);
  if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  decode_combine_kernel<<<static_cast<unsigned>(p.batch * p.hq), 128, 0, stream>>>(p, plan.splits,
                                                                                    part_out, part_lse);
  return cuda::last_launch_status();
}

// One query token; keys and values of head_dim 64, 128 or 256, keys of 192 with values of 128, or
// multi-head latent attention's 576 / 512 (the values the key rows' first dv channels, or rows of
// their own); groups a multiple of 16 channels; the cache rows aligned for the lanes' loads (dh / 8
// key bytes, dh / 16 value bytes, dh the channels of a warp: 128 beyond head_dim 128; 8 bytes of the
// 64 key channels past dv), 16-bit queries (if given) fp16 or bf16.
bool decode_tc_ok(const DecodeParams& p) {
  const int64_t dv = value_dim(p);
  const bool latent = p.d == kLatentD && dv == kLatentDv, mimo = p.d == kWideKeyD && dv == kWideKeyDv;
  if (p.q_tokens != 1 || p.group % 16 != 0) return false;
  if (!latent && !mimo && ((p.d != 64 && p.d != 128 && p.d != 256) || dv != p.d)) return false;
  const int64_t dh = dv > 128 ? 128 : dv;
  if (!cuda::is_aligned(p.k, dh / 8) || !cuda::is_aligned(p.v, dh / 16) || value_row(p) % (dh / 16) != 0) {
    return false;
  }
  if (p.q16 != nullptr && p.q16_dtype != DType::kFloat16 && p.q16_dtype != DType::kBFloat16) return false;
  return p.batch * p.hkv * ((p.hq / p.hkv + tcd::kRows - 1) / tcd::kRows) < (int64_t{1} << 31);
}

template <bool kSplit>
Status decode_tc_by_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (p.d) {
    case 64:
      return decode_tc<64, 64, kSplit>(p, stream);
    case 128:
      return decode_tc<128, 128, kSplit>(p, stream);
    case 256:
      return decode_tc<256, 256, kSplit>(p, stream);
    case kWideKeyD:  // (decode_tc_ok: values of kWideKeyDv channels)
      return decode_tc<kWideKeyD, kWideKeyDv, kSplit>(p, stream);
    default:  // (decode_tc_ok: multi-head latent attention)
      return decode_tc<kLatentD, kLatentDv, kSplit>(p, stream);
  }
}

Status decode_tc_dispatch(const DecodeParams& p, cudaStream_t stream) {
  return p.q16 != nullptr ? decode_tc_by_dim<false>(p, stream) : decode_tc_by_dim<true>(p, stream);
}

template <int C, int CV>
Status prefill_typed(const DecodeParams& p, cudaStream_t stream) {
  const int64_t warps = p.hq * (p.q_starts != nullptr ? p.q_total : p.batch * p.q_tokens);  // (rows of q)
  if (warps == 0) return Status::ok();
  const int block = kWarps * 32;
  prefill_kernel<C, CV><<<static_cast<unsigned>((warps * 32 + block - 1) / block), block, 0, stream>>>(p);
  return cuda::last_launch_status();
}

// The decode CTA's query heads for keys of C channels per lane.
constexpr int slice_heads(int c) { return c <= kMaxChannelsPerLane ? kSliceHeads : kLatentSliceHeads; }

// The channels a lane takes of rows of n channels on CUDA cores: even (whole bytes), enough for 32
// lanes to cover the row (the lanes past its end idle); 0 for an odd n or one wider than 256.
constexpr int lane_channels(int64_t n) {
  return n <= 0 || n % 2 || n > 32 * kMaxChannelsPerLane ? 0 : static_cast<int>((n + 63) / 64 * 2);
}

// The channels a lane takes of a decode's key rows: lane_channels(d), or kLatentD / 32 (18) for
// multi-head latent attention's rows of 576.
constexpr int decode_lane_channels(int64_t d) { return d == kLatentD ? kLatentD / 32 : lane_channels(d); }

int64_t decode_smem_bytes(int64_t d, int64_t dv) {
  const int c = decode_lane_channels(d);
  return static_cast<int64_t>(sizeof(float)) * kWarps * slice_heads(c) * (2 + dv);
}

template <int C, int CV>
Status decode_typed(const DecodeParams& p, cudaStream_t stream) {
  constexpr int H = slice_heads(C);
  const SplitPlan plan = split_plan(p.length, p.splits);
  float* part_out = p.workspace;
  float* part_lse = p.workspace + p.batch * p.hq * plan.splits * value_dim(p);
  const size_t smem = static_cast<size_t>(decode_smem_bytes(p.d, value_dim(p)));
  const int64_t slices = (p.hq / p.hkv + H - 1) / H;
  const dim3 grid(static_cast<unsigned>(p.batch * p.hkv * slices), static_cast<unsigned>(plan.splits));
  decode_split_kernel<C, CV, H><<<grid, kWarps * 32, smem, stream>>>(p, plan.chunk, plan.splits, part_out,
                                                               part_lse);
  if (Status s = cuda::last_launch_status(); !s.is_ok()) return s;
  decode_combine_kernel<<<static_cast<unsigned>(p.batch * p.hq), 128, 0, stream>>>(p, plan.splits,
                                                                                    part_out, part_lse);
  return cuda::last_launch_status();
}

// The kernels for keys of C and values of CV channels per lane (CV <= C: values no wider than keys).
template <int C, int CV>
Status launch(const DecodeParams& p, cudaStream_t stream) {
  if constexpr (CV > C) {
    return Status::unsupported("int4_kv_decode: the CUDA kernels take values no wider than the keys");
  } else {
    return p.q_tokens > 1 ? prefill_typed<C, CV>(p, stream) : decode_typed<C, CV>(p, stream);
  }
}

template <int C>
Status launch_by_value_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (lane_channels(value_dim(p))) {
    case 2:
      return launch<C, 2>(p, stream);
    case 4:
      return launch<C, 4>(p, stream);
    case 6:
      return launch<C, 6>(p, stream);
    case 8:
      return launch<C, 8>(p, stream);
    default:
      return Status::unsupported("int4_kv_decode: value head size not supported by the CUDA kernel");
  }
}

}  // namespace

bool decode_cuda_supported(int64_t hq, int64_t hkv, int64_t d, int64_t dv, int64_t batch) {
  if (hkv <= 0 || hq % hkv) return false;
  if (dv == 0) dv = d;
  const bool latent = d == kLatentD && dv == kLatentDv;
  if (!latent && (lane_channels(d) == 0 || lane_channels(dv) == 0 || dv > d)) return false;
  const int heads = slice_heads(decode_lane_channels(d));
  const int64_t slices = (hq / hkv + heads - 1) / heads;
  return decode_smem_bytes(d, dv) <= 48 * 1024 && batch * hkv * slices < (int64_t{1} << 31);
}

int64_t decode_cuda_workspace_floats(int64_t batch, int64_t hq, int64_t dv, int64_t length, int64_t splits) {
  const SplitPlan plan = split_plan(length, splits);
  return batch * hq * plan.splits * (dv + 1);
}

Status decode_cuda(const DecodeParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.batch > 0 && (p.q == nullptr || p.out == nullptr)) {
    return Status::invalid("int4_kv_decode: the CUDA kernels take fp32 q and out");
  }
  if (p.workspace == nullptr && p.q_tokens == 1) {
    return Status::invalid("int4_kv_decode: the CUDA kernel needs a workspace");
  }
  if (!decode_cuda_supported(p.hq, p.hkv, p.d, value_dim(p), p.batch)) {
    return Status::unsupported(
        "int4_kv_decode: the CUDA kernel needs an even head_dim up to 256 and values of an even "
        "number of channels no wider than the keys, or multi-head latent attention's 576 / 512");
  }
  if (p.batch == 0 || p.hq == 0) return Status::ok();
  const auto st = static_cast<cudaStream_t>(stream);
  // (the workspace is only needed by the split decode)
  if (p.q_tokens > 1 && prefill_tc_ok(p)) return prefill_tc_dispatch(p, st);
  if (p.q_tokens > 1 && prefill_latent_tc_ok(p)) return prefill_latent_tc_dispatch(p, st);
  if (p.q_tokens == 1 && decode_tc_ok(p)) return decode_tc_dispatch(p, st);
  switch (decode_lane_channels(p.d)) {
    case 2:
      return launch_by_value_dim<2>(p, st);
    case 4:
      return launch_by_value_dim<4>(p, st);
    case 6:
      return launch_by_value_dim<6>(p, st);
    case 8:
      return launch_by_value_dim<8>(p, st);
    case kLatentD / 32:  // (decode_cuda_supported: values of kLatentDv channels)
      return launch<kLatentD / 32, kLatentDv / 32>(p, st);
    default:
      return Status::unsupported("int4_kv_decode: head_dim not supported by the CUDA kernel");
  }
}

Status quantize_cuda(const QuantizeParams& p, void* stream) {
  if (Status s = validate(p); !s.is_ok()) return s;
  if (p.rows == 0) return Status::ok();
  const auto st = static_cast<cudaStream_t>(stream);
  FL_CUDA_BY_FLOAT_DTYPE(quantize_typed, p, st, "kv_quantize: dtype must be float32, float16 or bfloat16")
}

}  // namespace fastlayers::kvint4
