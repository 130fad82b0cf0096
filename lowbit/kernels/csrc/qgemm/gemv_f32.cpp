// Small M with fp32 activations (Gemv): one activation row against R weight rows at a time. The
// default small-M path rounds x to int16 (gemv_i16.cpp); this one serves groups of 32, rows with
// non-finite x, and forward_mode 4.
#include <cmath>
#include <vector>

#include "layer.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// ---------------------------------------------------------------------------------------
// M = 1: R rows at a time share every activation load. xs8[g] holds 8 partial sums of x
// over group g (their total is sum(x_g)), so the zero-point term costs one multiply per
// group instead of one per weight.
//
// 4-bit trick: nibble i (< 7) is isolated in place with one AND, so cvt yields q * 2^(4i)
// exactly (at most 4 significant bits); the 2^(-4i) factor is folded into a pre-scaled copy of
// x (xp), computed once per token. That drops the per-piece shift: and + cvt + fma per 8
// weights. The top nibble uses a shift instead (its in-place value would look negative).
template <int BITS, int R>
struct Gemv {
  const Layer& L;
  const float* x;
  const float* xs8;
  const uint8_t* wr[R];
  const float* sr[R];
  const float* zr[R];
  __m256 tot[R];
  __m256 acc[R];
  int64_t g = 0;
  int64_t left = 0;

  Gemv(const Layer& layer, const float* x_, const float* xs8_, int64_t n0)
      : L(layer), x(x_), xs8(xs8_) {
    for (int r = 0; r < R; ++r) {
      wr[r] = L.w + (n0 + r) * L.row_bytes;
      sr[r] = L.s + (n0 + r) * L.ng;
      zr[r] = L.off + (n0 + r) * L.off_row;
      tot[r] = _mm256_setzero_ps();
    }
    prefetch_group_params(L, n0, R);
    start_group();
  }

  inline void start_group() {
    left = L.gp;
    const __m256 xs = _mm256_loadu_ps(xs8 + 8 * g);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_mul_ps(_mm256_set1_ps(zr[r][g * L.off_grp]), xs);
  }

  inline void end_piece() {
    if (--left == 0) {
      for (int r = 0; r < R; ++r) tot[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(sr[r][g]), tot[r]);
      if (++g < L.ng) start_group();
    }
  }

  // x here is the pre-scaled copy: x[8p + j] * 2^(-4 (p % 8)) for p % 8 < 7.
  template <int I>
  inline void step4(const __m256i* v, int64_t p) {
    const __m256 xv = _mm256_loadu_ps(x + 8 * p);
    for (int r = 0; r < R; ++r) {
      __m256 q;
      if constexpr (I == 7) {
        q = _mm256_cvtepi32_ps(_mm256_srli_epi32(v[r], 28));
      } else {
        q = _mm256_cvtepi32_ps(_mm256_and_si256(v[r], _mm256_set1_epi32(0xF << (4 * I))));
      }
      acc[r] = _mm256_fmadd_ps(q, xv, acc[r]);
    }
    end_piece();
  }

  void run4() {
    const int64_t full = L.np / 8;
    const char* pf = prefetch_rows_base(L, wr[0], R);
    __m256i v[R];
    for (int64_t c = 0; c < full; ++c) {
      for (int o = 0; o < R * 32; o += 64) _mm_prefetch(pf + c * R * 32 + o, _MM_HINT_T0);
      for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_si256((const __m256i*)(wr[r] + 32 * c));
      const int64_t p = 8 * c;
      step4<0>(v, p + 0);
      step4<1>(v, p + 1);
      step4<2>(v, p + 2);
      step4<3>(v, p + 3);
      step4<4>(v, p + 4);
      step4<5>(v, p + 5);
      step4<6>(v, p + 6);
      step4<7>(v, p + 7);
    }
    const int rem = (int)(L.np - 8 * full);  // < 8, so every tail nibble index is < 7
    if (rem) {
      for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_si256((const __m256i*)(wr[r] + 32 * full));
      for (int i = 0; i < rem; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + 8 * (8 * full + i));
        const __m256i mask = _mm256_set1_epi32(0xF << (4 * i));
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v[r], mask)), xv, acc[r]);
        end_piece();
      }
    }
  }

  void run8() {
    const char* pf = prefetch_rows_base(L, wr[0], R);
    for (int64_t p = 0; p < L.np; ++p) {
      if ((p & 7) == 0)
        for (int o = 0; o < R * 64; o += 64) _mm_prefetch(pf + p * R * 8 + o, _MM_HINT_T0);
      const __m256 xv = _mm256_loadu_ps(x + 8 * p);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(load8_i8(wr[r] + 8 * p), xv, acc[r]);
      end_piece();
    }
  }

  void store(float* y, int64_t n0) {
    for (int r = 0; r < R; ++r) {
      float v = hsum(tot[r]);
      if (L.bias) v += L.bias[n0 + r];
      y[n0 + r] = v;
    }
  }
};

template <int BITS, int R>
void gemv_rows(const Layer& L, const float* x, const float* xs8, int64_t n0, float* y) {
  Gemv<BITS, R> k(L, x, xs8, n0);
  if constexpr (BITS == 4) k.run4(); else k.run8();
  k.store(y, n0);
}

// Partial sums of x per group, 8 lanes each (their total is sum(x_g)).
inline std::vector<float> group_sums8(const Layer& L, const float* x) {
  std::vector<float> xs8(8 * L.ng);
  for (int64_t g = 0; g < L.ng; ++g) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t p = g * L.gp; p < (g + 1) * L.gp; ++p) a = _mm256_add_ps(a, _mm256_loadu_ps(x + 8 * p));
    _mm256_storeu_ps(xs8.data() + 8 * g, a);
  }
  return xs8;
}

}  // namespace

template <int BITS>
void gemv(const Layer& L, const float* x, float* y) {
  constexpr int R = 4;
  const std::vector<float> xs8 = group_sums8(L, x);
  std::vector<float> xscaled;
  const float* xk = x;
  if constexpr (BITS == 4) {
    xscaled.resize(8 * L.np);
    for (int64_t p = 0; p < L.np; ++p) {
      const int i = (int)(p % 8);
      const __m256 f = _mm256_set1_ps(i == 7 ? 1.0f : std::ldexp(1.0f, -4 * i));
      _mm256_storeu_ps(xscaled.data() + 8 * p, _mm256_mul_ps(_mm256_loadu_ps(x + 8 * p), f));
    }
    xk = xscaled.data();
  }
  over_row_blocks<R>(L, [&](int64_t n0, int64_t rows) {
    with_rows<R>(rows, [&](auto r) { gemv_rows<BITS, decltype(r)::value>(L, xk, xs8.data(), n0, y); });
  });
}

template void gemv<4>(const Layer&, const float*, float*);
template void gemv<8>(const Layer&, const float*, float*);

}  // namespace lowbit::LOWBIT_ISA
