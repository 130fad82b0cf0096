// Packed rows -> fp32 rows: the dequantization behind gemm_blocked, gemm_tiled and dequantize().
#include "layer.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// Nibble I of every 32-bit lane, as fp32. I is a template argument so every shift is an
// immediate (a variable shift count costs an extra uop on most cores).
template <int I>
inline __m256 nibble(__m256i v, __m256i mask) {
  if constexpr (I == 0) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
  } else if constexpr (I == 7) {
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
  } else {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * I), mask));
  }
}

inline __m256 nibble_rt(__m256i v, __m256i mask, int i) {
  return _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set1_epi32(4 * i)), mask));
}

}  // namespace

// Dequantize rows [n0, n1) into out[(n - n0) * ldo + k] (fp32), w = (q + offset) * s.
template <int BITS>
void dequant_rows(const Layer& L, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = L.w + n * L.row_bytes;
    const float* sr = L.s + n * L.ng;
    const float* zr = L.off + n * L.off_row;
    float* o = out + (n - n0) * ldo;
    int64_t g = 0, left = L.gp;
    __m256 s = _mm256_set1_ps(sr[0]);
    __m256 b = _mm256_set1_ps(sr[0] * zr[0]);
    auto put = [&](__m256 q, int64_t p) {
      _mm256_storeu_ps(o + 8 * p, _mm256_fmadd_ps(q, s, b));
      if (--left == 0 && ++g < L.ng) {
        left = L.gp;
        s = _mm256_set1_ps(sr[g]);
        b = _mm256_set1_ps(sr[g] * zr[g * L.off_grp]);
      }
    };
    if constexpr (BITS == 4) {
      const int64_t full = L.np / 8;
      for (int64_t c = 0; c < full; ++c) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wr + 32 * c));
        const int64_t p = 8 * c;
        put(nibble<0>(v, mask), p + 0);
        put(nibble<1>(v, mask), p + 1);
        put(nibble<2>(v, mask), p + 2);
        put(nibble<3>(v, mask), p + 3);
        put(nibble<4>(v, mask), p + 4);
        put(nibble<5>(v, mask), p + 5);
        put(nibble<6>(v, mask), p + 6);
        put(nibble<7>(v, mask), p + 7);
      }
      const int rem = (int)(L.np - 8 * full);
      if (rem) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wr + 32 * full));
        for (int i = 0; i < rem; ++i) put(nibble_rt(v, mask, i), 8 * full + i);
      }
    } else {
      for (int64_t p = 0; p < L.np; ++p) put(load8_i8(wr + 8 * p), p);
    }
  }
}

template void dequant_rows<4>(const Layer&, int64_t, int64_t, float*, int64_t);
template void dequant_rows<8>(const Layer&, int64_t, int64_t, float*, int64_t);

}  // namespace lowbit::LOWBIT_ISA
