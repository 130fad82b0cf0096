// Paged decode attention: what its translation units share.
//
// One query token per sequence against its cached keys/values, read block by block in place:
// scores for the G query heads that share a kv head (GQA: each K/V row is read once for all G),
// an exact softmax, then the weighted sum of V. Scores are kept (G x context floats, a few KiB)
// rather than rescaled online: one pass over K, one over V, one exp per score, no per-block
// rescale of the accumulators. Tasks: one per sequence when there are several (attend_seq: rows
// read front to back across the kv heads), one per (sequence, kv head) for a single sequence
// (attend_one: its heads can still run in parallel).
//
// Pool element types (kv_cache.py's schemes): fp32 and bf16 hold the values (bf16 widened exactly
// as it is loaded); the quantized ones are dequantized as code * scale + zero inside the math,
// never into a copy:
//   int8: K and V per token and head, fp32 (scale, zero) [blocks, bs, Hkv, 2]:
//         q . k = scale * (q . codes) + zero * sum(q);
//   int4: V as int8 but 4-bit; K per channel over each block's tokens, fp16 (scale, zero)
//         [blocks, 2, Hkv, D]: q . k = (q * scale_blk) . codes + q . zero_blk, the two q-side
//         factors computed once per block;
//   both: sum_t p_t v_t = sum_t (p_t scale_t) codes_t + sum_t p_t zero_t.
//
// Files: attend_one.cpp (one sequence: a task per kv head), attend_seq.cpp (several sequences: a
// task per sequence), paged_attention.cpp (entry points: checks, task split).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/vec.h"

namespace lowbit::LOWBIT_ISA {

// The values are paged_decode_attention's kv_dtype codes (lowbit/layers/ops.py KV_CODES).
enum class Kv { F32 = 0, U8 = 1, U4 = 2, BF16 = 3 };

// Whether a pool of this type stores codes with scales and zeros (else the values themselves).
constexpr bool kv_quantized(Kv t) { return t == Kv::U8 || t == Kv::U4; }

// f(std::integral_constant<Kv, kind>{}): the pool type as a template argument.
template <typename F>
inline void with_kv(Kv kind, F&& f) {
  switch (kind) {
    case Kv::F32: f(std::integral_constant<Kv, Kv::F32>{}); break;
    case Kv::BF16: f(std::integral_constant<Kv, Kv::BF16>{}); break;
    case Kv::U8: f(std::integral_constant<Kv, Kv::U8>{}); break;
    default: f(std::integral_constant<Kv, Kv::U4>{}); break;
  }
}

template <Kv T>
struct KvRow;

template <>
struct KvRow<Kv::F32> {
  static inline __m256 load(const void* base, int64_t i, int64_t /*half*/) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }
};

// bf16 (the pool under dtype bfloat16): widened exactly, half fp32's bytes to stream.
template <>
struct KvRow<Kv::BF16> {
  static inline __m256 load(const void* base, int64_t i, int64_t /*half*/) {
    return load8_bf16(static_cast<const uint16_t*>(base) + i);
  }
};

template <>
struct KvRow<Kv::U8> {
  static inline __m256 load(const void* base, int64_t i, int64_t /*half*/) {
    return load8_u8(static_cast<const uint8_t*>(base) + i);
  }
};

// int4: byte j holds element j (low nibble) and element j + D/2 (high nibble).
template <>
struct KvRow<Kv::U4> {
  static inline __m256 load(const void* base, int64_t i, int64_t half) {
    const uint8_t* p = static_cast<const uint8_t*>(base) + (i < half ? i : i - half);
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i v = i < half ? _mm256_and_si256(b, _mm256_set1_epi32(15)) : _mm256_srli_epi32(b, 4);
    return _mm256_cvtepi32_ps(v);
  }
};

struct PagedArgs {
  const float* q;
  int64_t q_s_tok, q_s_head;
  const uint8_t* k;  // pool base, bytes
  const uint8_t* v;
  const float* k_sz;  // int8: [rows, Hkv, 2] (scale, zero) or nullptr
  const uint16_t* k_ch;  // int4: fp16 [blocks, 2, Hkv, D] per-channel (scale, zero) of each block
  const float* v_sz;
  int64_t row_bytes;  // bytes of one (token, head) row
  const int32_t* tables;
  int64_t max_blocks;
  const int32_t* lens;
  int64_t bs, Hkv, G, D;
  int64_t window;
  float scale;
  float* out;  // [B, Hq, D] contiguous
};

// Softmax over each of `rows` score rows of length n, in place (unnormalised: inv[r] = 1 / sum).
inline void softmax_rows(float* sc, int64_t rows, int64_t n, float* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = sc + r * n;
    __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
    float m = hmax(mv);
    for (; i < n; ++i) m = std::max(m, s[i]);
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mb));
      _mm256_storeu_ps(s + i, e);
      sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (; i < n; ++i) {
      s[i] = exp1(s[i] - m);
      sum += s[i];
    }
    inv[r] = 1.0f / sum;
  }
}

// The pool rows of the block holding token t of a sequence, from t to the block's end or len:
// {first pool row, count}. Both passes walk a sequence block by block with it.
struct BlockSpan {
  int64_t row0, cnt;
};
inline BlockSpan block_span(const PagedArgs& a, const int32_t* table, int64_t t, int64_t len) {
  const int64_t off = t % a.bs;
  return {static_cast<int64_t>(table[t / a.bs]) * a.bs + off, std::min(a.bs - off, len - t)};
}

// A sequence's V is prefetched during pass 1 only if it all fits this budget, a fraction of the
// 1-2 MiB L2 of current cores (a longer context would evict it before pass 2 reads it).
constexpr int64_t kPrefetchVBytes = 512 * 1024;

// One sequence b, kv head h (attend_one.cpp); all heads of sequence b (attend_seq.cpp). Both write
// a.out and size `buf` (the caller's per-thread scratch) themselves.
template <Kv T>
void attend_one(const PagedArgs& a, int64_t b, int64_t h, std::vector<float>& buf);
template <Kv T>
void attend_seq_dispatch(const PagedArgs& a, int64_t b, std::vector<float>& buf);

}  // namespace lowbit::LOWBIT_ISA
