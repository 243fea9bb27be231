// SPDX-License-Identifier: Apache-2.0
// CPU INT4 x FP8 GEMM, compiled once per ISA into fastlayers::cpu::<isa>::int4_fp8.
//
// Never a dequantised weight in memory: per output channel and K group, the 16 look-up-table values
// fp8(q * s8) are built in registers, and each weight byte's two nibbles index them (AVX-512: one
// vpermps over 16 entries; AVX2: two 8-entry vpermps and a blend on the nibble's top bit).
//
// Activations are staged once per chunk of kRowsPerStage rows: FP8 -> fp32 (a 256-entry table) and,
// inside each group, every 32 k (16 weight bytes) stored as [16 even k | 16 odd k], so the low
// nibbles of 16 bytes meet 16 consecutive floats and the high nibbles the next 16. A group's last
// group_size % 32 k stay in natural order and take a scalar tail.
//
// Work: OpenMP over output channels (static, so each thread streams a contiguous slice of the
// weight), micro-tiles of kRowTile rows x one channel: every table look-up feeds kRowTile FMAs. For
// decode (m = 1) the kernel reads 1/8 of the bytes of an fp32 weight. AVX-512, k and the group size
// multiples of 128: the tiles look up 64 weight bytes at once by dwords instead (tile_dwords), on
// activations staged to match.
//
// AVX512-BF16 (ISA level avx512_bf16, in the avx512 build): FP8 activations and the table values
// fp8(q * s8) are exact in bf16, so vdpbf16ps (two products per fp32 lane, each rounded into the fp32
// sum as an FMA would) does the same arithmetic with half the instructions. A weight byte holds the
// pair (even k, odd k) the instruction wants in one lane, so activations stage in natural order;
// when k and the group size are multiples of 128, the per-channel tiles (decode) look up 64 weight
// bytes at once by words instead (tile_words), on activations staged to match.
//
// NOTE(isa): no std:: templates and no non-static inline helpers here (see cmake/CpuIsa.cmake).
#include <omp.h>

#include "common/amx_cpu.h"
#include "common/cpu_isa.h"
#include "common/rows_cpu.h"
#include "common/simd_cpu.h"
#include "int4_fp8/int4_fp8.h"

namespace fastlayers::cpu::FL_CPU_ISA::int4_fp8 {

using fastlayers::int4_fp8::GemmParams;
using fastlayers::int4_fp8::QuantizeParams;

namespace {

constexpr int64_t kRowsPerStage = 32;   // activation rows staged at a time (32 x K fp32 stays in L2/L3)
constexpr int kRowTile = 4;             // rows per micro-tile
constexpr int64_t kPrefetchBytes = 1024;  // weight prefetch distance
constexpr int64_t kParallelMinWork = 1 << 17;  // m * n * k below this runs on one thread

// The tables the kernels look up besides fp8_values() (rows_cpu.h), built once: for each group-
// scale code s8 its 16-entry table fp8(q * s8), saturating, index = nibble code (0..7 -> q = 0..7,
// 8..15 -> q = -8..-1): as fp32 values and, since an fp8 value has 3 mantissa bits and so is exactly
// the top 16 bits of its fp32 pattern, as the low and high bytes of those 16 bits (vpshufb tables).
// A group's table is then one or two loads from L1 instead of 16 roundings.
struct Tables {
  float lut[256][16];
  uint8_t lut_bytes[256][32];  // [0, 16): low bytes, [16, 32): high bytes
  bf16_t fp8_bf16[256];        // each FP8 code as bf16 (exact)
  uint16_t lut_bf16[256][16];  // lut as bf16 bits (exact: the top 16 bits of the fp32 pattern)
  uint16_t lut_bf16x2[256][32];  // lut_bf16 twice: a vpermw table that ignores index bit 4
  Tables() {
    const float* fp8 = fp8_values();
    for (int c = 0; c < 256; ++c) {
      fp8_bf16[c] = bf16_t{static_cast<uint16_t>(float_bits(fp8[c]) >> 16)};
      for (int i = 0; i < 16; ++i) {
        lut[c][i] = to_float(to_fp8e4m3(static_cast<float>(i < 8 ? i : i - 16) * fp8[c]));
        const uint32_t top = float_bits(lut[c][i]) >> 16;
        lut_bytes[c][i] = static_cast<uint8_t>(top & 0xFF);
        lut_bytes[c][16 + i] = static_cast<uint8_t>(top >> 8);
        lut_bf16[c][i] = lut_bf16x2[c][i] = lut_bf16x2[c][16 + i] = static_cast<uint16_t>(top);
      }
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// Row tiles: fn(r, Rows<R>{}) for r = 0, kTile, 2 kTile, ... < rows with R = min(kTile, rows - r),
// so that every micro-kernel sees its row count at compile time.
template <int R>
struct Rows {
  static constexpr int value = R;
};
template <int R, typename Fn>
void with_rows(int64_t n, int64_t r, Fn& fn) {
  if constexpr (R > 1) {
    if (n < R) {
      with_rows<R - 1>(n, r, fn);
      return;
    }
  }
  fn(r, Rows<R>{});
}
template <int kTile, typename Fn>
void row_tiles(int64_t rows, Fn fn) {
  for (int64_t r = 0; r < rows; r += kTile) with_rows<kTile>(rows - r < kTile ? rows - r : kTile, r, fn);
}

#if defined(__AVX2__) && !defined(FL_AVX512)
// AVX2: 64 k (32 weight bytes) per chunk, in the order the byte look-ups produce them: staged vector
// v (8 floats) holds the low (v < 4) or high (v >= 4) nibbles of bytes 4 (v % 4) .. +3 and 16 + the
// same (the two 128-bit lanes).
constexpr int64_t kChunk = 64;
int chunk_k(int i) {
  const int v = i / 8, e = i % 8;
  const int byte = (e < 4 ? 0 : 16) + 4 * (v % 4) + e % 4;
  return 2 * byte + (v >= 4 ? 1 : 0);
}
#else
// 32 k (16 weight bytes) per chunk: [16 even k | 16 odd k].
constexpr int64_t kChunk = 32;
int chunk_k(int i) { return i < 16 ? 2 * i : 2 * (i - 16) + 1; }
#endif

// Row r of the activations -> fp32 in the staged layout: in each group, whole chunks in chunk_k
// order, the last group_size % kChunk k in natural order.
void stage_row(const GemmParams& p, int64_t row, float* out) {
  const float* f8 = fp8_values();
  const uint8_t* x = &p.xq[row * p.x_row_stride].bits;
  int order[kChunk];
  for (int i = 0; i < kChunk; ++i) order[i] = chunk_k(i);
  for (int64_t k0 = 0; k0 < p.k; k0 += p.group_size) {
    const int64_t len = p.k - k0 < p.group_size ? p.k - k0 : p.group_size;
    const int64_t full = len / kChunk * kChunk;
    for (int64_t c = 0; c < full; c += kChunk) {
      for (int i = 0; i < kChunk; ++i) out[k0 + c + i] = f8[x[k0 + c + order[i]]];
    }
    for (int64_t i = full; i < len; ++i) out[k0 + i] = f8[x[k0 + i]];
  }
}

float finish(const GemmParams& p, float acc, int64_t row, int64_t col) {
  float y = acc * p.xs[row] * p.channel_scale[col];
  if (p.bias != nullptr) {
    switch (p.bias_dtype) {
      case DType::kFloat16:
        y += to_float(static_cast<const half_t*>(p.bias)[col]);
        break;
      case DType::kBFloat16:
        y += to_float(static_cast<const bf16_t*>(p.bias)[col]);
        break;
      default:
        y += static_cast<const float*>(p.bias)[col];
    }
  }
  return y;
}

void store_out(const GemmParams& p, int64_t row, int64_t col, float v) {
  const int64_t i = row * p.n + col;
  switch (p.out_dtype) {
    case DType::kFloat16:
      store_as(static_cast<half_t*>(p.y) + i, v);
      break;
    case DType::kBFloat16:
      store_as(static_cast<bf16_t*>(p.y) + i, v);
      break;
    default:
      store_as(static_cast<float*>(p.y) + i, v);
  }
}

// The decode tiles' block look-ups (AVX-512: tile_dwords, AVX512-BF16: tile_words) take 128 k (64
// weight bytes) at a time, so k and the group size must be multiples of 128 (every Llama-class layer
// at the usual group sizes); other shapes take the chunked tiles.
constexpr int64_t kLookupBlock = 128;
constexpr int64_t kPairRowBytes = 32 * 1024;  // tile_dwords: channel pairs above this staged row size

[[maybe_unused]] bool block_lookup(const GemmParams& p) {
  return p.k % kLookupBlock == 0 && p.group_size % kLookupBlock == 0;
}

// Scalar tail of one group: natural-order activations, bytes of the weight row.
template <int R>
void group_tail(const uint8_t* w, int64_t bytes, const float* lut, const float* const* xr, float* acc) {
  for (int64_t b = 0; b < bytes; ++b) {
    const float lo = lut[w[b] & 0xF], hi = lut[w[b] >> 4];
    for (int r = 0; r < R; ++r) acc[r] += xr[r][2 * b] * lo + xr[r][2 * b + 1] * hi;
  }
}

#if defined(FL_AVX512)

// Panel decode (decode_panel): the table values of 16 weight bytes, even k and odd k.
using Lanes = __m512i;
void table_values(const float* lut, const uint8_t* w, Lanes& even, Lanes& odd) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  even = _mm512_castps_si512(_mm512_permutexvar_ps(v, table));
  odd = _mm512_castps_si512(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
}
void transpose(Lanes* v) { transpose16(v); }
void store_lanes(float* p, Lanes v) { _mm512_storeu_si512(p, v); }

// R rows x one channel over all of K: the 16 bytes of a chunk widen to 16 lanes; vpermps takes the
// low 4 bits of each lane as the index, so the low nibbles index directly and the high ones after a
// shift.
template <int R>
void tile(const GemmParams& p, int64_t col, const float* xs_base, float* out) {
  const Tables& tab = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  const uint8_t* wrow = p.qweight + col * (p.k / 2);
  const fp8e4m3_t* srow = p.group_scale + col * groups;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  float tail[R] = {};
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t k0 = j * p.group_size;
    const int64_t len = p.k - k0 < p.group_size ? p.k - k0 : p.group_size;
    const int64_t full = len / kChunk * kChunk;
    const float* lut_j = tab.lut[srow[j].bits];
    const __m512 lut = _mm512_loadu_ps(lut_j);
    for (int64_t c = 0; c < full; c += kChunk) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + (k0 + c) / 2)));
      const __m512 wlo = _mm512_permutexvar_ps(v, lut);
      const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
      for (int r = 0; r < R; ++r) {
        const float* x = xs_base + r * p.k + k0 + c;
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x), wlo, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), whi, acc[r][1]);
      }
    }
    if (full < len) {
      const float* xr[R];
      for (int r = 0; r < R; ++r) xr[r] = xs_base + r * p.k + k0 + full;
      group_tail<R>(wrow + (k0 + full) / 2, (len - full) / 2, lut_j, xr, tail);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + tail[r];
    out[r * p.n] = s;
  }
}

// Dword look-ups (block_lookup; the decode kernel without AVX512-BF16): 128 k are 64 weight bytes,
// loaded as 16 dwords of 8 nibbles each. vpermps reads the low 4 bits of an index dword, so the dword
// itself looks up its first nibble and the dword shifted right by 4, 8, ..., 28 its others: 128
// weights in 8 vectors for 7 shifts and 8 vpermps, where the chunked tile spends a widening load and
// two vpermps on every 32, and its loop and address arithmetic besides. Vector s holds k = 8 j + s in
// dword j, so a block of staged activations is the 128 k deinterleaved by 8 (stage_row_dwords).
void stage_row_dwords(const GemmParams& p, int64_t row, float* out) {
  const float* f8 = fp8_values();
  const uint8_t* x = &p.xq[row * p.x_row_stride].bits;
  for (int64_t k0 = 0; k0 < p.k; k0 += kLookupBlock) {
    for (int s = 0; s < 8; ++s) {
      for (int j = 0; j < 16; ++j) out[k0 + 16 * s + j] = f8[x[k0 + 8 * j + s]];
    }
  }
}

// One block of 128 k for R rows x C channels (weight rows ldw bytes apart): acc[r][c][s % 4] += the
// 16 k of vector s. Each index vector is the previous one shifted right by 4.
template <int R, int C>
inline void dwords_block(const uint8_t* w, int64_t ldw, const __m512 (&table)[C], const float* x, int64_t ldx,
                         __m512 (&acc)[R][C][4]) {
  __m512i v[C];
  for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_si512(w + c * ldw);
#pragma GCC unroll 8
  for (int s = 0; s < 8; ++s) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = _mm512_permutexvar_ps(v[c], table[c]);
      v[c] = _mm512_srli_epi32(v[c], 4);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + 16 * s);
      for (int c = 0; c < C; ++c) acc[r][c][s % 4] = _mm512_fmadd_ps(xv, wv[c], acc[r][c][s % 4]);
    }
  }
}

// R rows x C adjacent channels from col over all of K, four accumulators per row and channel whatever
// R and C (a row's sums do not depend on how many rows or channels share its tile). Two channels
// share each activation load: at k = 14336 the staged row (56 KiB) no longer fits L1, and one
// channel's 8 loads of it per 64 weight bytes ran the decode at about 3/4 of its speed at k = 4096.
template <int R, int C>
void tile_dwords(const GemmParams& p, int64_t col, const float* xs_base, float* out) {
  const Tables& tab = tables();
  const int64_t blocks = p.k / kLookupBlock, per_group = p.group_size / kLookupBlock;
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size, ldw = p.k / 2;
  const uint8_t* wrow = p.qweight + col * ldw;
  const fp8e4m3_t* srow = p.group_scale + col * groups;
  __m512 acc[R][C][4];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      for (int a = 0; a < 4; ++a) acc[r][c][a] = _mm512_setzero_ps();
    }
  }
  int64_t g = 0, in_group = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 table[C];
    for (int c = 0; c < C; ++c) {
      __builtin_prefetch(wrow + c * ldw + 64 * b + kPrefetchBytes);
      table[c] = _mm512_loadu_ps(tab.lut[srow[c * groups + g].bits]);
    }
    if (++in_group == per_group) in_group = 0, ++g;
    dwords_block<R, C>(wrow + 64 * b, ldw, table, xs_base + kLookupBlock * b, p.k, acc);
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]),
                                       _mm512_add_ps(acc[r][c][2], acc[r][c][3]));
      out[r * p.n + c] = _mm512_reduce_add_ps(sum);
    }
  }
}

#elif defined(__AVX2__)

// v[i] (i < 8: 8 rows of 8 lanes) transposed in place: lane j of v[i] becomes lane i of v[j].
void transpose8(__m256* v) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // v[i + q]: columns q and 4 + q of rows i .. i + 3
    v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    t[q] = _mm256_permute2f128_ps(v[q], v[4 + q], 0x20);
    t[4 + q] = _mm256_permute2f128_ps(v[q], v[4 + q], 0x31);
  }
  for (int i = 0; i < 8; ++i) v[i] = t[i];
}

// Panel decode (decode_panel): the table values of 8 weight bytes, even k and odd k. vpermps reads 3
// index bits, so each nibble looks up both 8-entry halves of the table and its bit 3 (moved to the
// sign) picks one.
using Lanes = __m256;
void table_values(const float* lut, const uint8_t* w, Lanes& even, Lanes& odd) {
  const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
  const __m256i u = _mm256_srli_epi32(v, 4);
  even = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, v), _mm256_permutevar8x32_ps(hi, v),
                          _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
  odd = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, u), _mm256_permutevar8x32_ps(hi, u),
                         _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
}
void transpose(Lanes* v) { transpose8(v); }
void store_lanes(float* p, Lanes v) { _mm256_storeu_ps(p, v); }

// R rows x one channel over all of K. Per 32 weight bytes: the nibbles index the byte tables
// (vpshufb), two unpacks per nibble set rebuild the 16-bit values and two more place them in the top
// halves of fp32 lanes: 64 weights in 8 vectors for 28 instructions, 8 of them FMAs per row.
template <int R>
void tile(const GemmParams& p, int64_t col, const float* xs_base, float* out) {
  constexpr int A = R == 1 ? 4 : 2;  // accumulators per row: enough independent FMA chains
  const Tables& tab = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  const uint8_t* wrow = p.qweight + col * (p.k / 2);
  const fp8e4m3_t* srow = p.group_scale + col * groups;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  float tail[R] = {};
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t k0 = j * p.group_size;
    const int64_t len = p.k - k0 < p.group_size ? p.k - k0 : p.group_size;
    const int64_t full = len / kChunk * kChunk;
    const uint8_t* tb = tab.lut_bytes[srow[j].bits];
    const __m256i t_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb)));
    const __m256i t_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + 16)));
    for (int64_t c = 0; c < full; c += kChunk) {
      // The weight streams from memory once: ask for it kPrefetchBytes ahead (past the row's end
      // is the next channel's row, which this thread reads next).
      __builtin_prefetch(wrow + (k0 + c) / 2 + kPrefetchBytes);
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + (k0 + c) / 2));
      const __m256i nib[2] = {_mm256_and_si256(wb, nibble), _mm256_and_si256(_mm256_srli_epi16(wb, 4), nibble)};
      for (int h = 0; h < 2; ++h) {
        const __m256i lo = _mm256_shuffle_epi8(t_lo, nib[h]), hi = _mm256_shuffle_epi8(t_hi, nib[h]);
        const __m256i w16[2] = {_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)};
        for (int q = 0; q < 4; ++q) {
          const __m256i bits = (q % 2 == 0) ? _mm256_unpacklo_epi16(zero, w16[q / 2]) : _mm256_unpackhi_epi16(zero, w16[q / 2]);
          const __m256 w = _mm256_castsi256_ps(bits);
          const int v = 4 * h + q;  // staged vector index (see chunk_k)
          for (int r = 0; r < R; ++r) {
            __m256& a = acc[r][v % A];
            a = _mm256_fmadd_ps(_mm256_loadu_ps(xs_base + r * p.k + k0 + c + 8 * v), w, a);
          }
        }
      }
    }
    if (full < len) {
      const float* xr[R];
      for (int r = 0; r < R; ++r) xr[r] = xs_base + r * p.k + k0 + full;
      group_tail<R>(wrow + (k0 + full) / 2, (len - full) / 2, tab.lut[srow[j].bits], xr, tail);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 s = acc[r][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][a]);
    const float sum = vsum(V{s}) + tail[r];
    out[r * p.n] = sum;
  }
}

#else  // scalar

template <int R>
void tile(const GemmParams& p, int64_t col, const float* xs_base, float* out) {
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  const uint8_t* wrow = p.qweight + col * (p.k / 2);
  const fp8e4m3_t* srow = p.group_scale + col * groups;
  const Tables& tab = tables();
  float acc[R] = {};
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t k0 = j * p.group_size;
    const int64_t len = p.k - k0 < p.group_size ? p.k - k0 : p.group_size;
    const int64_t full = len / kChunk * kChunk;
    const float* lut = tab.lut[srow[j].bits];
    for (int64_t c = 0; c < full; c += kChunk) {
      const uint8_t* wb = wrow + (k0 + c) / 2;
      for (int r = 0; r < R; ++r) {
        const float* x = xs_base + r * p.k + k0 + c;
        float s = 0.0f;
        for (int b = 0; b < kChunk / 2; ++b) s += x[b] * lut[wb[b] & 0xF] + x[kChunk / 2 + b] * lut[wb[b] >> 4];
        acc[r] += s;
      }
    }
    if (full < len) {
      const float* xr[R];
      for (int r = 0; r < R; ++r) xr[r] = xs_base + r * p.k + k0 + full;
      group_tail<R>(wrow + (k0 + full) / 2, (len - full) / 2, lut, xr, acc);
    }
  }
  for (int r = 0; r < R; ++r) out[r * p.n] = acc[r];
}

#endif

// Rows [0, rows) of the staged block x channels [c0, c1), over all of K, into out[row * n + col].
// Channel-major: a channel's weight row (k / 2 bytes) stays in L1 while every row tile reads it, and
// the weight streams from memory once per staged block, in order.
void block(const GemmParams& p, int64_t c0, int64_t c1, int64_t rows, const float* staged,
           float* out) {
#if defined(FL_AVX512)
  if (block_lookup(p)) {
    // Channel pairs when the staged rows do not fit L1 and are at most 2 (R x C x 4 accumulators
    // stay in registers). 2 threads, Ice Lake, weights cold, M = 1: pairs 1.13-1.20x at k = 14336
    // (a 56 KiB row), 0.85-0.90x at k = 4096.
    const bool pairs = rows <= 2 && p.k * sizeof(float) > kPairRowBytes;
    for (int64_t c = c0; c < c1;) {
      const bool pair = pairs && c + 1 < c1;
      row_tiles<kRowTile>(rows, [&](int64_t r, auto n) {
        constexpr int R = decltype(n)::value;
        if constexpr (R <= 2) {
          if (pair) return tile_dwords<R, 2>(p, c, staged + r * p.k, out + r * p.n + c);
        }
        tile_dwords<R, 1>(p, c, staged + r * p.k, out + r * p.n + c);
      });
      c += pair ? 2 : 1;
    }
    return;
  }
#endif
  for (int64_t c = c0; c < c1; ++c) {
    row_tiles<kRowTile>(rows, [&](int64_t r, auto n) {
      tile<decltype(n)::value>(p, c, staged + r * p.k, out + r * p.n + c);
    });
  }
}

// ---- Prefill (many rows): decoded weight panels and a register-blocked fp32 micro-kernel ----------
// For m >= kPanelMinRows the weight is decoded (look-up table, as above) into an fp32 panel of
// kPanelCols channels x kPanelK k that stays in L1, and every 6-row tile of the staged activations
// (natural order) runs a 6 x 2-vector FMA kernel over it: 12 FMAs per 2 weight loads and 6
// broadcasts, against one load per FMA in the per-channel tiles. The panel is decoded once per
// kPanelMaxRows rows, so the decode costs about 1/50 of the FMAs at 192 rows.
// The panels beat the per-channel tiles from 24 rows with AVX2, from 10 with AVX-512 and from 8
// with AVX512-BF16, once their decode is vectorized (2-core Zen 4, 4096 x 4096, C++ A/B in one
// process, panels over tiles: AVX2 1.01x at 24 rows, 0.87x at 20; AVX-512 1.24x at 12, 0.96x at 8;
// bf16 1.32x at 16, 1.0x at 8; bench/results/int4_fp8/NOTES.md).
#if defined(FL_AVX512)
constexpr int64_t kPanelMinRows = 10;
#elif defined(__AVX2__)
constexpr int64_t kPanelMinRows = 24;
#else
constexpr int64_t kPanelMinRows = 28;
#endif
constexpr int64_t kPanelMinRowsBf16 = 8;
constexpr int64_t kPanelMaxRows = 192;  // rows staged at a time (a multiple of kPanelTile)
constexpr int kPanelTile = 6;           // rows per micro-tile
constexpr int kPanelCols = 2 * kW;      // channels per panel
constexpr int64_t kPanelK = 256;        // k per panel (even)

// acc[r][0..kPanelCols) += x[r][0..len) . panel[0..len)[..] for R rows (row stride ldx).
template <int R>
void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t len, float* acc) {
  V a[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    a[r][0] = vload(acc + r * kPanelCols);
    a[r][1] = vload(acc + r * kPanelCols + kW);
  }
  for (int64_t kk = 0; kk < len; ++kk) {
    const V w0 = vload(panel + kk * kPanelCols), w1 = vload(panel + kk * kPanelCols + kW);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const V xb = vset1(x[r * ldx + kk]);
      a[r][0] = vfma(xb, w0, a[r][0]);
      a[r][1] = vfma(xb, w1, a[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    vstore(acc + r * kPanelCols, a[r][0]);
    vstore(acc + r * kPanelCols + kW, a[r][1]);
  }
}

// Bytes from k0 + from to k0 + len of channels [c, c + kPanelCols): put(j, kk, table, byte) for each,
// one look-up table per group segment (k0, from, len and group_size are even: whole bytes, and a
// byte never straddles two groups); a division per byte cost as much as the FMAs at 64 rows.
template <typename Put>
void decode_bytes(const GemmParams& p, int64_t c, int64_t k0, int64_t from, int64_t len, Put put) {
  const Tables& t = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  for (int j = 0; j < kPanelCols; ++j) {
    const uint8_t* w = p.qweight + (c + j) * (p.k / 2) + k0 / 2;
    const uint8_t* s8 = &p.group_scale[(c + j) * groups].bits;
    for (int64_t kk = from, g = (k0 + from) / p.group_size; kk < len; ++g) {
      const int64_t end = (g + 1) * p.group_size - k0 < len ? (g + 1) * p.group_size - k0 : len;
      const float* lut = t.lut[s8[g]];
      for (; kk < end; kk += 2) put(j, kk, lut, w[kk / 2]);
    }
  }
}

// Channels [c, c + kPanelCols), k [k0, k0 + len) -> panel[kk * kPanelCols + j] = fp8(q * s8).
// AVX-512 and AVX2, when every 2 kW k lie in one group (group_size % 32 or 16 == 0): kW channels x
// 2 kW k at a time, two vectors of table values per channel (even k, odd k) and two kW x kW
// transposes; the rest byte by byte.
void decode_panel(const GemmParams& p, int64_t c, int64_t k0, int64_t len, float* panel) {
  int64_t vec = 0;  // k decoded as vectors
#if defined(__AVX2__) || defined(FL_AVX512)
  const Tables& t = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  // kW channels x 2 kW k (kW bytes) at a time when every such run of k lies in one group.
  vec = p.group_size % (2 * kW) == 0 ? len / (2 * kW) * (2 * kW) : 0;
  for (int j0 = 0; j0 < kPanelCols; j0 += kW) {
    for (int64_t kk = 0; kk < vec; kk += 2 * kW) {
      const int64_t g = (k0 + kk) / p.group_size;
      Lanes even[kW], odd[kW];
      for (int i = 0; i < kW; ++i) {
        const int64_t ch = c + j0 + i;
        table_values(t.lut[p.group_scale[ch * groups + g].bits], p.qweight + ch * (p.k / 2) + (k0 + kk) / 2,
                     even[i], odd[i]);
      }
      transpose(even);
      transpose(odd);
      for (int i = 0; i < kW; ++i) {
        store_lanes(panel + (kk + 2 * i) * kPanelCols + j0, even[i]);
        store_lanes(panel + (kk + 2 * i + 1) * kPanelCols + j0, odd[i]);
      }
    }
  }
#endif
  decode_bytes(p, c, k0, vec, len, [panel](int j, int64_t kk, const float* lut, uint32_t byte) {
    panel[kk * kPanelCols + j] = lut[byte & 15u];
    panel[(kk + 1) * kPanelCols + j] = lut[byte >> 4];
  });
}

#if defined(FL_AVX512)
// ---- AVX512-BF16: the same tiles and panels through vdpbf16ps ------------------------------------
// Lane i of a dot product reads the bf16 pair (2i, 2i + 1) of both operands: a staged activation row
// is bf16 in natural order, and a weight byte becomes one lane, its low nibble's table value in the
// low half (even k) and its high nibble's in the high half (odd k).

constexpr int kRowTileBf16 = 8;
constexpr int kPanelTileBf16 = 8;  // rows per micro-tile: the weight decode is shared by 8 rows

void stage_row_bf16(const GemmParams& p, int64_t row, bf16_t* out) {
  const bf16_t* bf = tables().fp8_bf16;
  const uint8_t* x = &p.xq[row * p.x_row_stride].bits;
  for (int64_t k = 0; k < p.k; ++k) out[k] = bf[x[k]];
}

// The pair lanes of 16 weight bytes: table t_lo holds the group's values in the low 16 bits of each
// lane, t_hi in the high 16 (vpermd reads the low 4 bits of each index).
__m512i pair_lanes(const uint8_t* w, __m512i t_lo, __m512i t_hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm512_or_si512(_mm512_permutexvar_epi32(v, t_lo),
                         _mm512_permutexvar_epi32(_mm512_srli_epi32(v, 4), t_hi));
}

// R rows x one channel over all of K; two accumulators per row (64 k per step).
template <int R>
FL_TARGET_BF16 void tile_bf16(const GemmParams& p, int64_t col, const bf16_t* xs_base, float* out) {
  const Tables& tab = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  const uint8_t* wrow = p.qweight + col * (p.k / 2);
  const fp8e4m3_t* srow = p.group_scale + col * groups;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  float tail[R] = {};
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t k0 = j * p.group_size;
    const int64_t len = p.k - k0 < p.group_size ? p.k - k0 : p.group_size;
    const int64_t full = len / 32 * 32;
    const float* lut = tab.lut[srow[j].bits];
    const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(lut));
    const __m512i t_lo = _mm512_srli_epi32(bits, 16), t_hi = _mm512_and_si512(bits, high);
    int64_t c = 0;
    for (; c + 64 <= full; c += 64) {
      __builtin_prefetch(wrow + (k0 + c) / 2 + kPrefetchBytes);
      for (int h = 0; h < 2; ++h) {
        const __m512bh w = (__m512bh)pair_lanes(wrow + (k0 + c) / 2 + 16 * h, t_lo, t_hi);
        for (int r = 0; r < R; ++r) {
          const __m512i x = _mm512_loadu_si512(xs_base + r * p.k + k0 + c + 32 * h);
          acc[r][h] = _mm512_dpbf16_ps(acc[r][h], (__m512bh)x, w);
        }
      }
    }
    if (c < full) {
      const __m512bh w = (__m512bh)pair_lanes(wrow + (k0 + c) / 2, t_lo, t_hi);
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_loadu_si512(xs_base + r * p.k + k0 + c);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)x, w);
      }
    }
    for (int64_t kk = full; kk < len; kk += 2) {  // the group's last len % 32 k
      const uint32_t byte = wrow[(k0 + kk) / 2];
      const float lo = lut[byte & 15u], hi = lut[byte >> 4];
      for (int r = 0; r < R; ++r) {
        const bf16_t* x = xs_base + r * p.k + k0 + kk;
        tail[r] += to_float(x[0]) * lo + to_float(x[1]) * hi;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r * p.n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + tail[r];
  }
}

// Word look-ups (k and group_size multiples of 128; the decode kernel): 128 k are 64 weight bytes,
// loaded as 32 words of 4 nibbles each. vpermw reads the low 5 bits of an index word, so over a
// table holding the group's 16 bf16 values twice (lut_bf16x2) the word itself looks up its first
// nibble, and the word shifted right by 4, 8 and 12 its others: 128 weights in 4 vectors for 3
// shifts and 4 vpermw, where pair_lanes spends 3 shuffle-port instructions on every 32. Vector s
// holds k = 4 j + s in word j, so a block of staged activations is the 128 k deinterleaved by 4
// (stage_row_words): dpbf16 lane i pairs k 8 i + s with 8 i + 4 + s in both operands.
void stage_row_words(const GemmParams& p, int64_t row, bf16_t* out) {
  const bf16_t* bf = tables().fp8_bf16;
  const uint8_t* x = &p.xq[row * p.x_row_stride].bits;
  for (int64_t k0 = 0; k0 < p.k; k0 += kLookupBlock) {
    for (int s = 0; s < 4; ++s) {
      for (int j = 0; j < 32; ++j) out[k0 + 32 * s + j] = bf[x[k0 + 4 * j + s]];
    }
  }
}

// One block of 128 k for R rows: acc[r][(O + s) % A] += the 32 k of vector s.
template <int R, int A, int O>
FL_TARGET_BF16 inline void words_block(const uint8_t* w, __m512i table, const bf16_t* x, int64_t ldx,
                                       __m512 (&acc)[R][A]) {
  const __m512i v = _mm512_loadu_si512(w);
  const __m512i wv[4] = {_mm512_permutexvar_epi16(v, table),
                         _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table),
                         _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table),
                         _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table)};
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx + 32 * s);
      acc[r][(O + s) % A] = _mm512_dpbf16_ps(acc[r][(O + s) % A], xv, (__m512bh)wv[s]);
    }
  }
}

// R rows x one channel over all of K. One row gets 8 accumulators (two blocks per step): the
// dpbf16 latency, not the look-ups, would bound a single chain per vector.
template <int R>
FL_TARGET_BF16 void tile_words(const GemmParams& p, int64_t col, const bf16_t* xs_base, float* out) {
  constexpr int A = R == 1 ? 8 : R <= 4 ? 4 : 2;
  const Tables& tab = tables();
  const int64_t blocks = p.k / kLookupBlock, per_group = p.group_size / kLookupBlock;
  const uint8_t* wrow = p.qweight + col * (p.k / 2);
  const fp8e4m3_t* srow = p.group_scale + col * ((p.k + p.group_size - 1) / p.group_size);
  __m512 acc[R][A];
  for (int r = 0; r < R; ++r) {
    for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
  }
  int64_t b = 0, g = 0, in_group = 0;
  auto table = [&]() {  // the current block's group table, then on to the next block
    const __m512i t = _mm512_loadu_si512(tab.lut_bf16x2[srow[g].bits]);
    if (++in_group == per_group) in_group = 0, ++g;
    return t;
  };
  for (; b + 2 <= blocks; b += 2) {
    __builtin_prefetch(wrow + 64 * b + kPrefetchBytes);
    __builtin_prefetch(wrow + 64 * b + 64 + kPrefetchBytes);
    const __m512i t0 = table(), t1 = table();
    words_block<R, A, 0>(wrow + 64 * b, t0, xs_base + kLookupBlock * b, p.k, acc);
    words_block<R, A, 4>(wrow + 64 * (b + 1), t1, xs_base + kLookupBlock * (b + 1), p.k, acc);
  }
  if (b < blocks) words_block<R, A, 0>(wrow + 64 * b, table(), xs_base + kLookupBlock * b, p.k, acc);
  for (int r = 0; r < R; ++r) {
    __m512 sum = acc[r][0];
    for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[r][a]);
    out[r * p.n] = _mm512_reduce_add_ps(sum);
  }
}

// Staged rows in natural order (stage_row_bf16), or deinterleaved for the word look-ups.
void block_bf16(const GemmParams& p, int64_t c0, int64_t c1, int64_t rows, const bf16_t* staged,
                float* out) {
  const bool words = block_lookup(p);
  for (int64_t c = c0; c < c1; ++c) {
    row_tiles<kRowTileBf16>(rows, [&](int64_t r, auto n) {
      if (words) {
        tile_words<decltype(n)::value>(p, c, staged + r * p.k, out + r * p.n + c);
      } else {
        tile_bf16<decltype(n)::value>(p, c, staged + r * p.k, out + r * p.n + c);
      }
    });
  }
}

// Panels of pairs: panel[kp * kPanelCols + j] = (w[2 kp][c + j], w[2 kp + 1][c + j]) as bf16, which
// is one weight byte: the k of a panel are whole bytes (k0, len and group_size are even). When every
// 32 k lie in one group (group_size % 32 == 0), 16 channels x 32 k decode as 16 vectors of pairs and
// one transpose; the rest byte by byte.
void decode_panel_bf16(const GemmParams& p, int64_t c, int64_t k0, int64_t len, uint32_t* panel) {
  const Tables& t = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  const int64_t vec = p.group_size % 32 == 0 ? len / 32 * 32 : 0;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int j0 = 0; j0 < kPanelCols; j0 += 16) {
    for (int64_t kk = 0; kk < vec; kk += 32) {
      const int64_t g = (k0 + kk) / p.group_size;
      __m512i v[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t ch = c + j0 + i;
        const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(t.lut[p.group_scale[ch * groups + g].bits]));
        v[i] = pair_lanes(p.qweight + ch * (p.k / 2) + (k0 + kk) / 2, _mm512_srli_epi32(bits, 16),
                          _mm512_and_si512(bits, high));
      }
      transpose16(v);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(panel + (kk / 2 + i) * kPanelCols + j0, v[i]);
    }
  }
  decode_bytes(p, c, k0, vec, len, [panel](int j, int64_t kk, const float* lut, uint32_t byte) {
    panel[kk / 2 * kPanelCols + j] = (float_bits(lut[byte & 15u]) >> 16) | (float_bits(lut[byte >> 4]) & 0xFFFF0000u);
  });
}

// acc[r][0..kPanelCols) += x[r][0..2 pairs) . panel for R rows (row stride ldx, in bf16).
template <int R>
FL_TARGET_BF16 void panel_tile_bf16(const bf16_t* x, int64_t ldx, const uint32_t* panel, int64_t pairs,
                                    float* acc) {
  __m512 a[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    a[r][0] = _mm512_loadu_ps(acc + r * kPanelCols);
    a[r][1] = _mm512_loadu_ps(acc + r * kPanelCols + kW);
  }
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + kp * kPanelCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + kp * kPanelCols + kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      __builtin_memcpy(&pair, x + r * ldx + 2 * kp, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      a[r][0] = _mm512_dpbf16_ps(a[r][0], xb, w0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], xb, w1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(acc + r * kPanelCols, a[r][0]);
    _mm512_storeu_ps(acc + r * kPanelCols + kW, a[r][1]);
  }
}
#endif  // FL_AVX512

// Rows [0, rows) of one staged block x the kPanelCols channels of one panel.
void panel_rows(const float* staged, int64_t ldx, const float* panel, int64_t len, int64_t rows, float* acc) {
  row_tiles<kPanelTile>(rows, [&](int64_t r, auto n) {
    panel_tile<decltype(n)::value>(staged + r * ldx, ldx, panel, len, acc + r * kPanelCols);
  });
}

#if defined(FL_AVX512)
void panel_rows_bf16(const bf16_t* staged, int64_t ldx, const uint32_t* panel, int64_t len, int64_t rows,
                     float* acc) {
  row_tiles<kPanelTileBf16>(rows, [&](int64_t r, auto n) {
    panel_tile_bf16<decltype(n)::value>(staged + r * ldx, ldx, panel, len / 2, acc + r * kPanelCols);
  });
}
#endif

// bf16: the activations stage as bf16 and the panels as bf16 pairs (AVX512-BF16 only).
void gemm_panels(const GemmParams& p, bool bf16) {
  const int64_t stage_rows = p.m < kPanelMaxRows ? p.m : kPanelMaxRows;
  float* staged = bf16 ? nullptr : new float[stage_rows * p.k];
  bf16_t* staged16 = bf16 ? new bf16_t[stage_rows * p.k] : nullptr;
  const float* f8 = fp8_values();
  const int64_t blocks = p.n / kPanelCols;
#pragma omp parallel
  {
    alignas(64) float panel[kPanelK * kPanelCols];
#if defined(FL_AVX512)
    alignas(64) uint32_t panel16[kPanelK / 2 * kPanelCols];
#endif
    alignas(64) float acc[kPanelMaxRows * kPanelCols];
    for (int64_t m0 = 0; m0 < p.m; m0 += kPanelMaxRows) {
      const int64_t rows = p.m - m0 < kPanelMaxRows ? p.m - m0 : kPanelMaxRows;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {  // FP8 -> fp32 or bf16, natural order
#if defined(FL_AVX512)
        if (bf16) {
          stage_row_bf16(p, m0 + r, staged16 + r * p.k);
          continue;
        }
#endif
        const uint8_t* x = &p.xq[(m0 + r) * p.x_row_stride].bits;
        for (int64_t k = 0; k < p.k; ++k) staged[r * p.k + k] = f8[x[k]];
      }
      // (implicit barrier: every row is staged before any block reads it)
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c = b * kPanelCols;
        for (int64_t i = 0; i < rows * kPanelCols; ++i) acc[i] = 0.0f;
        for (int64_t k0 = 0; k0 < p.k; k0 += kPanelK) {
          const int64_t len = p.k - k0 < kPanelK ? p.k - k0 : kPanelK;
#if defined(FL_AVX512)
          if (bf16) {
            decode_panel_bf16(p, c, k0, len, panel16);
            panel_rows_bf16(staged16 + k0, p.k, panel16, len, rows, acc);
            continue;
          }
#endif
          decode_panel(p, c, k0, len, panel);
          panel_rows(staged + k0, p.k, panel, len, rows, acc);
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int j = 0; j < kPanelCols; ++j) {
            store_out(p, m0 + r, c + j, finish(p, acc[r * kPanelCols + j], m0 + r, c + j));
          }
        }
      }
      // (implicit barrier: nobody restages while another thread still reads)
    }
  }
  delete[] staged;
  delete[] staged16;
}

#if defined(FL_AMX)
// ---- AMX-BF16 (ISA level amx_bf16): tile-register GEMM ---------------------------------------------
// tdpbf16ps C[16 x 16] += A[16 x 32] . B[32 x 16] in fp32 from bf16 pairs, exact products as in
// vdpbf16ps (FP8 activations and table values fp8(q * s8) are exact in bf16; every product is a
// multiple of 2^-18, so the instruction's flush of denormals never changes a sum).
//
// The weight is the A operand: a tile row is one channel's 32 k, which is 16 weight bytes looked up
// in the channel's group table in natural k order (widen each byte to a dword, its two nibbles into
// the two words: one vpermw over the 16 bf16 table values), so the decode needs no transpose. The
// activations are the B operand, staged once per call in the pair layout the instruction reads
// ([k / 2][m][2]). The C tile comes out [channel][row] and is transposed once per 16 x 16 outputs,
// after all of K, to finish (scales, bias, rounding) 16 channels of a row at a time.
// Tile assignment per pass: pass_amx. The tile configuration and compiler fences: common/amx_cpu.h.

constexpr int64_t kAmxStageRows = 128;  // activation rows staged at a time (multiple of 32)
constexpr int64_t kAmxChunk = 128;        // k blocks (of 32) per decoded weight chunk with more than 32 rows
constexpr int kTileBytes = 1024;        // 16 rows x 64 bytes
constexpr int64_t kAmxPrefetchBytes = 512;  // weight prefetch distance per channel row
constexpr int64_t kAmxMinRows = 4;     // rows from which the tiles beat the vdpbf16ps kernels

// Rows [m0, m0 + rows) of the activations, FP8 -> bf16 pairs: staged[(b * kb_count + kb) * 256 +
// r * 16 + i] holds k 32 kb + 2 r and + 1 of row m0 + 16 b + i; rows past the end are zeros.
void stage_rows_amx(const GemmParams& p, int64_t m0, int64_t rows, int64_t block, uint32_t* staged) {
  const bf16_t* bf = tables().fp8_bf16;
  const int64_t kbs = p.k / 32;
  uint32_t* out = staged + block * kbs * 256;
  for (int i = 0; i < 16; ++i) {
    const int64_t row = 16 * block + i;
    if (row >= rows) {
      for (int64_t kp = 0; kp < p.k / 2; ++kp) out[(kp / 16) * 256 + (kp % 16) * 16 + i] = 0;
      continue;
    }
    const uint8_t* x = &p.xq[(m0 + row) * p.x_row_stride].bits;
    for (int64_t kp = 0; kp < p.k / 2; ++kp) {
      out[(kp / 16) * 256 + (kp % 16) * 16 + i] = static_cast<uint32_t>(bf[x[2 * kp]].bits) |
                                                   (static_cast<uint32_t>(bf[x[2 * kp + 1]].bits) << 16);
    }
  }
}

// Channels [c, c + 16), k [32 kb, 32 kb + 32) -> an A tile (16 rows of 32 bf16, natural order).
FL_TARGET_AMX void decode_tile_amx(const GemmParams& p, int64_t c, int64_t kb, uint16_t* tile) {
  const Tables& t = tables();
  const int64_t groups = (p.k + p.group_size - 1) / p.group_size;
  const int64_t g = kb * 32 / p.group_size;
  for (int i = 0; i < 16; ++i) {
    const int64_t ch = c + i;
    const uint8_t* w = p.qweight + ch * (p.k / 2) + kb * 16;
    const __m512i table = _mm512_castsi256_si512(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.lut_bf16[p.group_scale[ch * groups + g].bits])));
    if ((kb & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(w) + kAmxPrefetchBytes, _MM_HINT_T0);
    _mm512_storeu_si512(tile + 32 * i, int4_lookup_bf16(w, table));
  }
}

// One C tile (16 channels from c x 16 staged rows from row0) finished into y.
void finish_tile_amx(const GemmParams& p, const float* acc, int64_t c, int64_t row0, int64_t rows) {
  __m512i v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(acc + 16 * i);
  transpose16(v);  // v[r]: row r's 16 channels
  const V cs = vload(p.channel_scale + c);
  V bias = vzero();
  if (p.bias != nullptr) {
    switch (p.bias_dtype) {
      case DType::kFloat16:
        bias = vload(static_cast<const half_t*>(p.bias) + c);
        break;
      case DType::kBFloat16:
        bias = vload(static_cast<const bf16_t*>(p.bias) + c);
        break;
      default:
        bias = vload(static_cast<const float*>(p.bias) + c);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const V y = vadd(vmul(vmul(V{_mm512_castsi512_ps(v[r])}, vset1(p.xs[row0 + r])), cs), bias);
    const int64_t i = (row0 + r) * p.n + c;
    switch (p.out_dtype) {
      case DType::kFloat16:
        vstore(static_cast<half_t*>(p.y) + i, y);
        break;
      case DType::kBFloat16:
        vstore(static_cast<bf16_t*>(p.y) + i, y);
        break;
      default:
        vstore(static_cast<float*>(p.y) + i, y);
    }
  }
}

// Where a pass gets its weight tiles: decoded into two alternating slots (kSlots), decoded into the
// panel for the passes after it (kPanel), or read from the panel (kNo).
enum class Decode { kNo, kSlots, kPanel };

// NB channel blocks from c x MB row blocks (staged from x) over k blocks [kb0, kb1) into the C tiles
// at acc (tile t at acc + 256 t, after adding what acc holds when accumulate). Two row blocks: C
// tile 2 j + h is channel block j x row block h, the weight in tmm4-5, the rows in tmm6-7 (four tile
// loads per four products). One row block: up to four channel blocks, C tile j, the weight in tmm4,
// 5, 7, 4 and the rows in tmm6 (five loads per four products). decode: each k block's weight is
// decoded into two alternating slots at a, k block kb + 1 while the tiles of kb multiply (its stores
// then have an iteration to reach L1 before the tile loads read them); else a holds the decoded
// tiles of [kb0, kb1).
template <int NB, int MB>
FL_TARGET_AMX void pass_amx(const GemmParams& p, int64_t c, const uint32_t* x, int64_t kb0, int64_t kb1,
                            uint16_t* a, Decode decode, float* acc, bool accumulate) {
  static_assert(MB == 1 ? NB >= 1 && NB <= 4 : MB == 2 && NB >= 1 && NB <= 2, "tile budget: 8 tiles");
  constexpr int kTiles = NB * MB;   // accumulators 0 .. kTiles - 1
  constexpr int64_t kA = kTileBytes / 2;  // uint16 per weight tile
  const int64_t block_stride = p.k / 32 * 256;  // between the staged row blocks
  // the k block's weight tiles in a: two alternating slots, or the block's place in the panel
  const auto slot = [&](int64_t kb) { return decode == Decode::kSlots ? (kb & 1) : kb - kb0; };
  if (accumulate) {
    _tile_loadd(0, acc, 64);
    if constexpr (kTiles > 1) _tile_loadd(1, acc + 256, 64);
    if constexpr (kTiles > 2) _tile_loadd(2, acc + 512, 64);
    if constexpr (kTiles > 3) _tile_loadd(3, acc + 768, 64);
  } else {
    _tile_zero(0);
    if constexpr (kTiles > 1) _tile_zero(1);
    if constexpr (kTiles > 2) _tile_zero(2);
    if constexpr (kTiles > 3) _tile_zero(3);
  }
  if (decode != Decode::kNo) {
    for (int j = 0; j < NB; ++j) decode_tile_amx(p, c + 16 * j, kb0, a + (slot(kb0) * NB + j) * kA);
  }
  amx_fence();
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint16_t* at = a + slot(kb) * NB * kA;
    const uint32_t* xb = x + kb * 256;
    if constexpr (MB == 2) {
      _tile_loadd(4, at, 64);
      _tile_loadd(6, xb, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, xb + block_stride, 64);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NB == 2) {
        _tile_loadd(5, at + kA, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    } else {
      _tile_loadd(6, xb, 64);
      _tile_loadd(4, at, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB > 1) {
        _tile_loadd(5, at + kA, 64);
        _tile_dpbf16ps(1, 5, 6);
      }
      if constexpr (NB > 2) {
        _tile_loadd(7, at + 2 * kA, 64);
        _tile_dpbf16ps(2, 7, 6);
      }
      if constexpr (NB > 3) {
        _tile_loadd(4, at + 3 * kA, 64);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    if (decode != Decode::kNo && kb + 1 < kb1) {
      amx_fence();
      for (int j = 0; j < NB; ++j) decode_tile_amx(p, c + 16 * j, kb + 1, a + (slot(kb + 1) * NB + j) * kA);
      amx_fence();
    }
  }
  _tile_stored(0, acc, 64);
  if constexpr (kTiles > 1) _tile_stored(1, acc + 256, 64);
  if constexpr (kTiles > 2) _tile_stored(2, acc + 512, 64);
  if constexpr (kTiles > 3) _tile_stored(3, acc + 768, 64);
  amx_fence();
}

FL_TARGET_AMX void pass_amx(int nb, int mb, const GemmParams& p, int64_t c, const uint32_t* x, int64_t kb0,
                            int64_t kb1, uint16_t* a, Decode decode, float* acc, bool accumulate) {
  if (mb == 2) {
    if (nb == 2) pass_amx<2, 2>(p, c, x, kb0, kb1, a, decode, acc, accumulate);
    else pass_amx<1, 2>(p, c, x, kb0, kb1, a, decode, acc, accumulate);
    return;
  }
  switch (nb) {
    case 4:
      return pass_amx<4, 1>(p, c, x, kb0, kb1, a, decode, acc, accumulate);
    case 3:
      return pass_amx<3, 1>(p, c, x, kb0, kb1, a, decode, acc, accumulate);
    case 2:
      return pass_amx<2, 1>(p, c, x, kb0, kb1, a, decode, acc, accumulate);
    default:
      return pass_amx<1, 1>(p, c, x, kb0, kb1, a, decode, acc, accumulate);
  }
}

// Needs k and group_size multiples of 32 and n a multiple of 16 (gemm() checks). Per task of four
// channel blocks (up to 16 staged rows) or two (more): up to 32 rows, one pass that decodes the
// weight on the way; more rows, k chunks of kAmxChunk blocks, the first row pair's pass decoding the
// chunk into a panel (L2) that the other pairs' passes read; between chunks each pair's C tiles are
// stored and reloaded.
FL_TARGET_AMX void gemm_amx(const GemmParams& p) {
  const int64_t kbs = p.k / 32;
  const int64_t stage_rows = p.m < kAmxStageRows ? p.m : kAmxStageRows;
  uint32_t* staged = new uint32_t[(stage_rows + 15) / 16 * kbs * 256];
  const int64_t channel_blocks = p.n / 16;
  const bool parallel = p.m * p.n * p.k >= kParallelMinWork;
#pragma omp parallel if (parallel)
  {
    amx_configure();
    uint16_t* panel = new uint16_t[2 * kAmxChunk * (kTileBytes / 2)];
    float* acc = new float[kAmxStageRows / 32 * 1024];
    for (int64_t m0 = 0; m0 < p.m; m0 += kAmxStageRows) {
      const int64_t rows = p.m - m0 < kAmxStageRows ? p.m - m0 : kAmxStageRows;
      const int64_t blocks = (rows + 15) / 16, pairs = (blocks + 1) / 2;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) stage_rows_amx(p, m0, rows, b, staged);
      // (implicit barrier: every block is staged before any pass reads it)
      // channel blocks per task: four with one row block, else two
      const int64_t group = blocks == 1 ? 4 : 2, tasks = (channel_blocks + group - 1) / group;
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t c = 16 * group * task;
        const int nb = static_cast<int>(channel_blocks - group * task < group ? channel_blocks - group * task : group);
        if (pairs == 1) {
          pass_amx(nb, static_cast<int>(blocks), p, c, staged, 0, kbs, panel, Decode::kSlots, acc, false);
        } else {
          for (int64_t kb0 = 0; kb0 < kbs; kb0 += kAmxChunk) {
            const int64_t kb1 = kb0 + kAmxChunk < kbs ? kb0 + kAmxChunk : kbs;
            // The first row pair decodes the chunk for the rest on its way (7-13 % faster than a
            // decode loop of its own before the passes, 64-1024 rows, 4096 x 4096, interleaved A/B).
            for (int64_t q = 0; q < pairs; ++q) {
              const int mb = 2 * q + 1 < blocks ? 2 : 1;
              const Decode decode = q == 0 ? Decode::kPanel : Decode::kNo;
              pass_amx(nb, mb, p, c, staged + 2 * q * kbs * 256, kb0, kb1, panel, decode, acc + 1024 * q, kb0 > 0);
            }
          }
        }
        for (int64_t q = 0; q < pairs; ++q) {
          const int mb = 2 * q + 1 < blocks ? 2 : 1;
          for (int j = 0; j < nb; ++j) {
            for (int h = 0; h < mb; ++h) {
              const int64_t r = 32 * q + 16 * h;
              const int tile = mb == 2 ? 2 * j + h : j;
              finish_tile_amx(p, acc + 1024 * q + 256 * tile, c + 16 * j, m0 + r, rows - r < 16 ? rows - r : 16);
            }
          }
        }
      }
      // (implicit barrier: nobody restages while another thread still reads)
    }
    delete[] acc;
    delete[] panel;
    _tile_release();
  }
  delete[] staged;
}
#endif  // AMX

template <typename T>
void quantize_rows(const QuantizeParams& p) {
  const int64_t n = p.cols;
  const bool parallel = p.rows * n >= kParallelMinWork;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t row = 0; row < p.rows; ++row) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    V m = vzero(), nan = vzero();
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      const V v = vload(x + i);
      m = vmax(m, vabs(v));
      nan = vfma(v, vzero(), nan);  // NaN once any element is NaN or infinite
    }
    float amax = vmaxval(m);
    bool has_nan = vsum(nan) != 0.0f;  // NaN != 0
    for (; i < n; ++i) {
      const float a = __builtin_fabsf(to_float(x[i]));
      amax = a > amax ? a : amax;
      has_nan = has_nan || a != a;
    }
    if (has_nan) {  // tell an infinity (scale inf) from a NaN (scale 1), as the reference does
      has_nan = false;
      for (int64_t j = 0; j < n; ++j) has_nan = has_nan || to_float(x[j]) != to_float(x[j]);
      if (!has_nan) amax = __builtin_inff();
    }
    const float scale = (!has_nan && amax > 0.0f) ? amax / kFp8E4M3Max : 1.0f;
    p.xs[row] = scale;
    fp8e4m3_t* y = p.xq + row * n;
    const V vs = vset1(scale);
    i = 0;
    for (; i + kW <= n; i += kW) vstore(y + i, vdiv(vload(x + i), vs));
    for (; i < n; ++i) y[i] = to_fp8e4m3(to_float(x[i]) / scale);
  }
}

}  // namespace

Status gemm(const GemmParams& p) {
#if defined(FL_AMX)
  if (active_isa() >= Isa::kAmxBf16 && p.m >= kAmxMinRows && p.k % 32 == 0 && p.group_size % 32 == 0 &&
      p.n % 16 == 0) {
    gemm_amx(p);
    return Status::ok();
  }
#endif
#if defined(FL_AVX512)
  const bool bf16 = active_isa() >= Isa::kAvx512Bf16;
#else
  const bool bf16 = false;
#endif
  if (p.m >= (bf16 ? kPanelMinRowsBf16 : kPanelMinRows) && p.n % kPanelCols == 0) {
    gemm_panels(p, bf16);
    return Status::ok();
  }
  const int64_t stage_rows = p.m < kRowsPerStage ? p.m : kRowsPerStage;
  float* staged = bf16 ? nullptr : new float[stage_rows * p.k];
  bf16_t* staged16 = bf16 ? new bf16_t[stage_rows * p.k] : nullptr;
  float* sums = new float[stage_rows * p.n];
  const bool parallel = p.m * p.n * p.k >= kParallelMinWork;
#pragma omp parallel if (parallel)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t c0 = p.n * t / threads, c1 = p.n * (t + 1) / threads;  // this thread's channels
    for (int64_t m0 = 0; m0 < p.m; m0 += kRowsPerStage) {
      const int64_t rows = p.m - m0 < kRowsPerStage ? p.m - m0 : kRowsPerStage;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
#if defined(FL_AVX512)
        if (bf16) {
          if (block_lookup(p)) {
            stage_row_words(p, m0 + r, staged16 + r * p.k);
          } else {
            stage_row_bf16(p, m0 + r, staged16 + r * p.k);
          }
          continue;
        }
        if (block_lookup(p)) {
          stage_row_dwords(p, m0 + r, staged + r * p.k);
          continue;
        }
#endif
        stage_row(p, m0 + r, staged + r * p.k);
      }
      // (implicit barrier: every row is staged before any channel reads it)
#if defined(FL_AVX512)
      if (bf16) block_bf16(p, c0, c1, rows, staged16, sums);
#endif
      if (!bf16) block(p, c0, c1, rows, staged, sums);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = c0; c < c1; ++c) store_out(p, m0 + r, c, finish(p, sums[r * p.n + c], m0 + r, c));
      }
#pragma omp barrier
      // (nobody restages while another thread still reads)
    }
  }
  delete[] sums;
  delete[] staged;
  delete[] staged16;
  return Status::ok();
}

Status quantize(const QuantizeParams& p) {
  FL_CPU_BY_FLOAT_DTYPE(quantize_rows, p, "quantize_fp8_per_token: dtype must be float32, float16 or bfloat16")
}

}  // namespace fastlayers::cpu::FL_CPU_ISA::int4_fp8
