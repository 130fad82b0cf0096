// Small M with activations rounded to int16 (Gemv16): the default decode path of every linear
// whose groups are whole 64-weight chunks.
#include <cmath>
#include <vector>

#include "layer.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// Small M, integer dot products: x is rounded to int16 with one step per 64-weight chunk, so
// q . x_chunk is an exact integer sum and vpmaddwd does 16 multiply-adds per uop where the float
// path spends a cvt and an FMA per 8. Per 64 weights and row: 3 shifts + 3 ands + 4 vpmaddwd +
// 4 adds (4-bit; 4 sign extensions instead for 8-bit), then one cvt + FMA by the chunk's step.
//
// Accuracy: the rounding moves each x by at most step/2 = max|x_chunk| / 65534 and the result is
// exactly W x_rounded, so an output moves by at most sum_k |w_k| step_k / 2, ~1e-5 relative (fp16
// activations, the usual W4A16, round each x to 5e-4 of itself). Outlier channels only coarsen the
// step of their own 64-wide chunk. Non-finite x, and x so small that 1 / step would overflow, go
// to the float path, so NaN/Inf still propagate.
//
// Lane order: vpmaddwd adds adjacent int16 products, so x16 is laid out as the weights unpack.
// 4-bit: bits 4i'..4i'+3 of 16-bit lane 2j + h of a chunk's 32 bytes are nibble 4h + i' of word j,
// i.e. weight 32h + 8i' + j (see the layout in layer.h); piece i' (one shift + mask) of x16 therefore
// holds x[32h + 8i' + j] at lane 2j + h. 8-bit: natural order (sign-extended bytes).
constexpr float kX16Max = 32767.0f;

// Int16 copy of x in the kernel's lane order plus each chunk's step; false if x is not finite.
template <int BITS>
bool prepare_x16(const float* x, int64_t k8, int64_t chunks, int16_t* xi, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 lim = _mm256_set1_ps(kX16Max);
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(32) float buf[64];
    const int64_t k0 = 64 * c, n = std::min<int64_t>(64, k8 - k0);
    __m256 mv = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t i = 0; i < 64; i += 8) {
      const __m256 v = i < n ? _mm256_loadu_ps(x + k0 + i) : _mm256_setzero_ps();  // n % 8 == 0
      _mm256_store_ps(buf + i, v);
      mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, v));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps would drop a NaN
    }
    if (_mm256_movemask_ps(bad)) return false;
    const float m = hmax(mv);
    if (!std::isfinite(m) || (m > 0 && m < 1e-30f)) return false;
    const float step = m > 0 ? m / kX16Max : 1.0f;
    sx[c] = step;
    const __m256 inv = _mm256_set1_ps(1.0f / step);
    __m256i q[8];  // int32 codes of the 8 pieces (round to nearest even, |code| <= 32767)
    for (int i = 0; i < 8; ++i) {
      __m256 v = _mm256_mul_ps(_mm256_load_ps(buf + 8 * i), inv);
      v = _mm256_max_ps(_mm256_min_ps(v, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
      q[i] = _mm256_cvtps_epi32(v);
    }
    int16_t* out = xi + 64 * c;
    if constexpr (BITS == 4) {
      // piece i' interleaves x[8 i' + j] (low half of each 32-bit lane) with x[32 + 8 i' + j]
      const __m256i lo16 = _mm256_set1_epi32(0xFFFF);
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_or_si256(_mm256_and_si256(q[i], lo16), _mm256_slli_epi32(q[4 + i], 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i), v);
      }
    } else {
      for (int i = 0; i < 4; ++i) {  // packs interleaves 128-bit halves; the permute restores order
        const __m256i v = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * i], q[2 * i + 1]), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i), v);
      }
    }
  }
  return true;
}

// 64-weight chunks per row, and chunks per quantization group (groups are whole chunks on the
// Gemv16 path, or one group spans the row).
inline int64_t chunks_of(const Layer& L) { return (8 * L.np + 63) / 64; }
inline int64_t chunks_per_group(const Layer& L) { return L.ng == 1 ? chunks_of(L) : L.gp / 8; }

// X16: one activation row prepared for Gemv16 (int16 codes in lane order, per-chunk steps, and
// the per-group sums of the rounded x for the zero point's term).
struct X16 {
  std::vector<int16_t> xi;
  std::vector<float> sx, xs8;
};

// False if x is not finite (the caller then runs the fp32-x gemv for that row).
template <int BITS>
bool prepare_row16(const Layer& L, const float* x, X16& o) {
  const int64_t chunks = chunks_of(L);
  o.xi.resize(64 * chunks);
  o.sx.resize(chunks);
  if (!prepare_x16<BITS>(x, 8 * L.np, chunks, o.xi.data(), o.sx.data())) return false;
  // The zero point's term takes the sums of the *rounded* x, so the result is exactly W x_rounded:
  // its error is sum_k |w_k| step_k / 2, not the larger |q_k| (codes are not centred).
  o.xs8.assign(8 * L.ng, 0.0f);
  const int64_t cpg = chunks_per_group(L);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < chunks; ++c) {
    __m256i t = _mm256_setzero_si256();
    for (int i = 0; i < 64; i += 16)
      t = _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(o.xi.data() + 64 * c + i)), ones));
    float* d = o.xs8.data() + 8 * (c / cpg);
    _mm256_storeu_ps(d, _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(o.sx[c]), _mm256_loadu_ps(d)));
  }
  return true;
}

// R weight rows against MR activation rows: every chunk of W is unpacked once for all MR rows.
template <int BITS, int R, int MR>
struct Gemv16 {
  const Layer& L;
  const X16* const* xr;  // MR prepared activation rows
  const uint8_t* wr[R];
  const float* sr[R];
  const float* zr[R];
  __m256 tot[R][MR];
  __m256 acc[R][MR];

  Gemv16(const Layer& layer, const X16* const* xr_, int64_t n0) : L(layer), xr(xr_) {
    for (int r = 0; r < R; ++r) {
      wr[r] = L.w + (n0 + r) * L.row_bytes;
      sr[r] = L.s + (n0 + r) * L.ng;
      zr[r] = L.off + (n0 + r) * L.off_row;
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_setzero_ps();
    }
    prefetch_group_params(L, n0, R);
  }

  inline void start_group(int64_t g) {
    for (int m = 0; m < MR; ++m) {
      const __m256 xs = _mm256_loadu_ps(xr[m]->xs8.data() + 8 * g);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_mul_ps(_mm256_set1_ps(zr[r][g * L.off_grp]), xs);
    }
  }

  inline void end_group(int64_t g) {
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(sr[r][g]);
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_fmadd_ps(acc[r][m], s, tot[r][m]);
    }
  }

  // acc[r][m] += step_m(c) * (integer sum of chunk c of row r against x row m).
  inline void chunk(int64_t c) {
    if constexpr (BITS == 4) {
      const __m256i mask = _mm256_set1_epi16(0xF);
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wr[r] + 32 * c));
        const __m256i w0 = _mm256_and_si256(v, mask);
        const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        const __m256i w2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), mask);
        const __m256i w3 = _mm256_srli_epi16(v, 12);
        for (int m = 0; m < MR; ++m) {
          const int16_t* xc = xr[m]->xi.data() + 64 * c;
          const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(xc)));
          const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(xc + 16)));
          const __m256i p2 = _mm256_madd_epi16(w2, _mm256_loadu_si256((const __m256i*)(xc + 32)));
          const __m256i p3 = _mm256_madd_epi16(w3, _mm256_loadu_si256((const __m256i*)(xc + 48)));
          const __m256i ai = _mm256_add_epi32(_mm256_add_epi32(p0, p1), _mm256_add_epi32(p2, p3));
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(xr[m]->sx[c]), acc[r][m]);
        }
      }
    } else {
      const int64_t k0 = 64 * c, n = std::min<int64_t>(64, 8 * L.np - k0);  // a multiple of 8
      __m256i ai[R][MR];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MR; ++m) ai[r][m] = _mm256_setzero_si256();
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        for (int r = 0; r < R; ++r) {
          const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr[r] + k0 + i)));
          for (int m = 0; m < MR; ++m)
            ai[r][m] = _mm256_add_epi32(
                ai[r][m], _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i*)(xr[m]->xi.data() + k0 + i))));
        }
      }
      if (i < n) {  // 8 left
        for (int r = 0; r < R; ++r) {
          const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wr[r] + k0 + i)));
          for (int m = 0; m < MR; ++m) {
            const __m128i p = _mm_madd_epi16(w, _mm_loadu_si128((const __m128i*)(xr[m]->xi.data() + k0 + i)));
            ai[r][m] = _mm256_add_epi32(ai[r][m], _mm256_zextsi128_si256(p));
          }
        }
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 s = _mm256_set1_ps(xr[m]->sx[c]);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[r][m]), s, acc[r][m]);
      }
    }
  }

  void run() {
    constexpr int64_t chunk_bytes = BITS == 4 ? 32 : 64;
    const int64_t chunks = chunks_of(L), cpg = chunks_per_group(L);
    const char* pf = prefetch_rows_base(L, wr[0], R);
    int64_t g = 0, left = cpg;
    start_group(0);
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t o = 0; o < R * chunk_bytes; o += 64) _mm_prefetch(pf + c * R * chunk_bytes + o, _MM_HINT_T0);
      chunk(c);
      if (--left == 0) {
        end_group(g);
        left = cpg;
        if (++g < L.ng) start_group(g);
      }
    }
  }

  // y row of activation row m is y_rows[m]
  void store(float* const* y_rows, int64_t n0) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MR; ++m) {
        float v = hsum(tot[r][m]);
        if (L.bias) v += L.bias[n0 + r];
        y_rows[m][n0 + r] = v;
      }
  }
};

}  // namespace

// y[m] = W x[m] for M activation rows (row stride ldx / ldy). Rows with non-finite x run the
// fp32-x gemv; the others go through Gemv16 four at a time, W streamed once per four rows.
template <int BITS>
void gemv16_batch(const Layer& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  constexpr int kRowsPerPass = 4;  // activation rows per sweep over W (accumulators fill the registers)
  // Reused across calls (a decode token runs ~120 linears): buffers keep their capacity. Bound to
  // local references, so the worker threads below read the calling thread's copies (a lambda
  // naming a thread_local directly would get the worker's own, empty one).
  struct Scratch {
    std::vector<X16> prepared;
    std::vector<const X16*> xr;
    std::vector<float*> yr;
  };
  thread_local Scratch scratch;
  auto& prepared = scratch.prepared;
  auto& xr = scratch.xr;
  auto& yr = scratch.yr;
  if (static_cast<int64_t>(prepared.size()) < M) prepared.resize(M);
  xr.clear();
  yr.clear();
  for (int64_t m = 0; m < M; ++m) {
    if (prepare_row16<BITS>(L, x + m * ldx, prepared[m])) {
      xr.push_back(&prepared[m]);
      yr.push_back(y + m * ldy);
    } else {
      gemv<BITS>(L, x + m * ldx, y + m * ldy);
    }
  }
  const int64_t n = static_cast<int64_t>(xr.size());
  if (n == 1) {
    // Rows per block, measured (576 -> 3072 and 576 -> 49152, 2 threads): 4-bit 2 rows (3 and 4
    // spill registers: 1.1-1.25x slower), 8-bit 3 rows.
    constexpr int R = BITS == 4 ? 2 : 3;
    over_row_blocks<R>(L, [&](int64_t n0, int64_t rows) {
      with_rows<R>(rows, [&](auto r) {
        Gemv16<BITS, decltype(r)::value, 1> k(L, xr.data(), n0);
        k.run();
        k.store(yr.data(), n0);
      });
    });
  } else if (n > 1) {
    over_row_blocks<1>(L, [&](int64_t n0, int64_t) {
      for (int64_t m0 = 0; m0 < n; m0 += kRowsPerPass) {
        with_rows<kRowsPerPass>(std::min<int64_t>(kRowsPerPass, n - m0), [&](auto mr) {
          Gemv16<BITS, 1, decltype(mr)::value> k(L, xr.data() + m0, n0);
          k.run();
          k.store(yr.data() + m0, n0);
        });
      }
    });
  }
}

template void gemv16_batch<4>(const Layer&, const float*, int64_t, int64_t, float*, int64_t);
template void gemv16_batch<8>(const Layer&, const float*, int64_t, int64_t, float*, int64_t);

}  // namespace lowbit::LOWBIT_ISA
