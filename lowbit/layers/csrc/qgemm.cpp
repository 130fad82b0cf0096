// Weight-only quantized linear kernels for CPU decode (AVX2 + FMA, fp32 activations).
//
// Why a custom kernel: PyTorch's int4/int8 weight-pack matmuls only vectorize bf16/fp16
// activations on x86; with fp32 activations they run a scalar loop that is 10-100x slower
// than fp32 BLAS. At decode (M = 1) the job is to stream the packed weight at memory speed,
// so the inner loop has to turn packed integers into fp32 with as few uops as possible.
//
// Packed layouts (built by lowbit/layers/linear.py, one row of W per row of the tensor):
//   4-bit: K is padded to a multiple of 64. Each 64-weight chunk is 32 bytes = 8 uint32
//          words; nibble i (bits 4i..4i+3) of word j holds weight k = 64*c + 8*i + j.
//          One 256-bit load + a shift and a mask yields 8 consecutive weights in lane order,
//          without any cross-lane shuffle.
//   8-bit: plain row-major int8 [N, K8] holding q - 2^(bits-1) (K8 = K rounded up to 8), so a
//          tied embedding and PyTorch's int8 weight-only matmul can share it.
// Scales: float32 [N, ngroups]; offset: float32 offset per group (or one broadcast value when
// every zero is equal, e.g. symmetric quantization), so W = (stored + offset) * scale, i.e.
// offset = -zero for 4-bit and 2^(bits-1) - zero for the 8-bit container.
//
// Small M (gemv, decode) uses a factored dot product: y = sum_g s_g * (dot(q_g, x_g) + off_g *
// sum(x_g)), so no weight is ever scaled individually. By default (Gemv16, M <= kGemvMaxM) x is
// rounded to int16 per 64-weight chunk and dot(q_g, x_g) is an integer sum, 16 multiply-adds per
// vpmaddwd (1.4-1.5x faster than fp32 x), each chunk of W unpacked once for up to 4 rows of x;
// Gemv keeps x in fp32 (and + cvt + fma per 8 weights) for groups of 32 (M = 1 only) and
// non-finite x.
// M > 1 (gemm_blocked) dequantizes a block of rows once into an L2-resident fp32 buffer and
// runs a register-tiled microkernel over it. Large M (gemm_tiled) dequantizes W into a reused
// fp32 scratch and hands it to the BLAS sgemm (compute-bound there; see linear.py TILE_MIN_M).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

struct Layer {
  const uint8_t* w;      // packed weights
  int64_t row_bytes;     // bytes per packed row
  const float* s;        // [N, ng]
  const float* off;      // offset per group: W = (stored + off) * s
  int64_t off_row;       // row stride of off (0 when constant)
  int64_t off_grp;       // group stride of off (0 when constant)
  const float* bias;     // [N] or nullptr
  int64_t ng;            // groups per row
  int64_t gp;            // pieces (of 8 weights) per group
  int64_t np;            // pieces per row (= K8 / 8)
  int64_t n;             // output features
};

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

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

// 8 signed bytes -> fp32 (the 8-bit container stores centred int8, so PyTorch's int8 ops and
// the tied embedding can read the same tensor).
inline __m256 byte8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// Both gemv kernels prefetch the row block this many blocks ahead (rows are contiguous, so that
// is one sequential stream): one block is ~0.1 us of work, shorter than a DRAM round trip.
constexpr int kPrefetchBlocks = 4;

// The scales/offsets of the R-row block kPrefetchBlocks ahead of row n0.
inline void prefetch_group_params(const Layer& L, int64_t n0, int R) {
  const int64_t ahead = n0 + kPrefetchBlocks * R;
  for (int64_t o = 0; o < R * L.ng; o += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(L.s + ahead * L.ng + o), _MM_HINT_T0);
    if (L.off_row) _mm_prefetch(reinterpret_cast<const char*>(L.off + ahead * L.off_row + o), _MM_HINT_T0);
  }
}

// The packed bytes of that block, given the block's first row (the loops add the chunk offset).
inline const char* prefetch_rows_base(const Layer& L, const uint8_t* row0, int R) {
  return reinterpret_cast<const char*>(row0 + kPrefetchBlocks * R * L.row_bytes);
}

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
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(byte8(wr[r] + 8 * p), xv, acc[r]);
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

// f(std::integral_constant<int, rows>) for 1 <= rows <= R: row counts as template arguments.
template <int R, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R > 1) {
    if (rows < R) return with_rows<R - 1>(rows, f);
  }
  f(std::integral_constant<int, R>{});
}

// Rows in blocks of R over the threads; kernel(n0, rows) computes rows n0 .. n0 + rows - 1.
template <int R, typename F>
void over_row_blocks(const Layer& L, F&& kernel) {
  const int64_t blocks = (L.n + R - 1) / R;
  // ~32k weights per task: below that, waking a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / (R * 8 * L.np));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) kernel(b * R, std::min<int64_t>(R, L.n - b * R));
  });
}

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

// ---------------------------------------------------------------------------------------
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
// i.e. weight 32h + 8i' + j (see the layout above); piece i' (one shift + mask) of x16 therefore
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
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float m = _mm_cvtss_f32(m4);
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

// Whether gemv16 applies: its x steps are per 64-weight chunk, so groups must be whole chunks.
inline bool gemv16_fits(const Layer& L) { return L.ng == 1 || L.gp % 8 == 0; }

// Up to this many rows, gemv16 (W streamed once per 4 activation rows) beats dequantizing into
// fp32 (gemm_blocked): every linear of the default model in turn, cold, 2 threads: M = 2 5.4 vs
// 12.7 ms, M = 4 8.3 vs 13.7, M = 8 16.6 vs 21.0, M = 12 28.9 vs 28.5, M = 16 32.8 vs 31.0.
constexpr int64_t kGemvMaxM = 12;

// ---------------------------------------------------------------------------------------
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
      for (int64_t p = 0; p < L.np; ++p) put(byte8(wr + 8 * p), p);
    }
  }
}

// ---------------------------------------------------------------------------------------
// M > 1: dequantize a block of rows into an L2-resident fp32 buffer once, then run a 4x3
// register-tiled dot-product microkernel over it (12 accumulators, 7 loads per 12 FMAs), which
// keeps both FMA ports busy like an sgemm while reading W's packed bytes only once per
// 64 activation rows.
template <int MR, int NR>
inline void micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k8,
                  float* y, int64_t ldy, const float* bias) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

template <int NR>
inline void micro_m(int64_t mr, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k8,
                    float* y, int64_t ldy, const float* bias) {
  switch (mr) {
    case 4: micro<4, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
    case 3: micro<3, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
    case 2: micro<2, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
    default: micro<1, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
  }
}

template <int BITS>
void gemm_blocked(const Layer& L, const float* x, int64_t M, int64_t ldx, float* y) {
  constexpr int64_t MR = 4, NR = 3, MC = 64;
  const int64_t k8 = 8 * L.np;
  // Rows per block: ~96 KiB of fp32 (fits L2 with the activation panel), a multiple of NR,
  // and small enough that every thread gets a few blocks.
  int64_t nb = std::max<int64_t>(NR, (96 * 1024 / 4) / k8 / NR * NR);
  const int64_t per_thread = (L.n + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  nb = std::max<int64_t>(NR, std::min(nb, (per_thread + NR - 1) / NR * NR));
  const int64_t blocks = (L.n + nb - 1) / nb;
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t mc = std::min(MC, M - m0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::unique_ptr<float[]> buf(new float[nb * k8]);  // uninitialized: fully overwritten
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * nb, nr_block = std::min(nb, L.n - n0);
        dequant_rows<BITS>(L, n0, n0 + nr_block, buf.get(), k8);
        for (int64_t i = 0; i < mc; i += MR) {
          const int64_t mr = std::min(MR, mc - i);
          const float* xi = x + (m0 + i) * ldx;
          float* yi = y + (m0 + i) * L.n + n0;
          for (int64_t j = 0; j < nr_block; j += NR) {
            const float* bias = L.bias ? L.bias + n0 + j : nullptr;
            const float* wj = buf.get() + j * k8;
            switch (std::min(NR, nr_block - j)) {
              case 3: micro_m<3>(mr, xi, ldx, wj, k8, k8, yi + j, L.n, bias); break;
              case 2: micro_m<2>(mr, xi, ldx, wj, k8, k8, yi + j, L.n, bias); break;
              default: micro_m<1>(mr, xi, ldx, wj, k8, k8, yi + j, L.n, bias); break;
            }
          }
        }
      }
    });
  }
}

// Per-thread scratch for gemm_tiled, reused across calls (a fresh multi-MB allocation per call
// would be page-faulted in on every linear of every step).
float* tile_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if ((int64_t)buf.size() < floats) buf.resize(floats);
  return buf.data();
}

// Large M (prefill chunks, wide decode batches) is compute-bound, so the multiply goes to the
// BLAS sgemm, which runs at the machine's widest SIMD; dequantization costs N*K once against
// M*N*K multiply-adds. Two ways to feed it, measured (bench_kernels.py --modes):
//  * M < kWholeM: each thread takes whole tiles of rows, dequantizes one (sized to stay in its
//    L2) into its own scratch and multiplies it at once with a single-threaded sgemm (nested in
//    the parallel region), so the fp32 weights never go to memory and back;
//  * M >= kWholeM: the sgemm itself dominates and runs best as one large multi-threaded call, so
//    W is dequantized in 8 MiB tiles (every decoder linear of a small model in one).
constexpr int64_t kWholeM = 256;

int64_t tile_bytes() {
  static const int64_t b = [] {
    const char* e = std::getenv("LOWBIT_TILE_KB");  // for re-measuring on other caches
    return (e ? std::atoll(e) : 1024) * 1024;
  }();
  return b;
}

template <int BITS>
void gemm_tiled(const Layer& L, const at::Tensor& x, at::Tensor& y) {
  const int64_t k8 = 8 * L.np;
  // y[:, n0 : n0 + nr] = x @ tile^T, tile = fp32 rows n0.. of W at t
  auto multiply = [&](const float* t, int64_t n0, int64_t nr) {
    auto yt = y.narrow(1, n0, nr);
    at::mm_out(yt, x, at::from_blob(const_cast<float*>(t), {nr, k8}, x.options()).t());
  };
  if (x.size(0) >= kWholeM) {
    const int64_t rows = std::clamp<int64_t>((8 << 20) / 4 / k8, 64, L.n);
    float* t = tile_scratch(rows * k8);
    for (int64_t n0 = 0; n0 < L.n; n0 += rows) {
      const int64_t nr = std::min(rows, L.n - n0);
      at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
        dequant_rows<BITS>(L, n0 + r0, n0 + r1, t + r0 * k8, k8);
      });
      multiply(t, n0, nr);
    }
  } else {
    // As many tiles as the L2 budget needs, rounded up to a multiple of the thread count and
    // then cut equal: at decode widths every thread must get the same rows (2 threads over 960
    // rows in 448-row tiles gave one thread 896 rows and the other 64).
    const int64_t max_rows = std::clamp<int64_t>(tile_bytes() / 4 / k8 / 16 * 16, 16, L.n);
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t needed = (L.n + max_rows - 1) / max_rows;               // tiles the L2 budget asks for
    const int64_t want = (needed + threads - 1) / threads * threads;      // ... a multiple of the threads
    const int64_t rows = std::min<int64_t>(L.n, ((L.n + want - 1) / want + 15) / 16 * 16);  // equal, 16-row aligned
    const int64_t tiles = (L.n + rows - 1) / rows;
    const bool inference = c10::InferenceMode::is_enabled();  // worker threads do not inherit it
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      c10::InferenceMode guard(inference);
      float* t = tile_scratch(rows * k8);
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t n0 = ti * rows, nr = std::min(rows, L.n - n0);
        dequant_rows<BITS>(L, n0, n0 + nr, t, k8);
        multiply(t, n0, nr);
      }
    });
  }
  if (L.bias) y.add_(at::from_blob((void*)L.bias, {L.n}, x.options()));
}

Layer make_layer(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offset,
                 const c10::optional<at::Tensor>& bias, int64_t bits, int64_t k8, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8 (packed container width)");
  TORCH_CHECK((w.dtype() == at::kByte || w.dtype() == at::kChar) && w.is_contiguous() && w.dim() == 2,
              "packed weight must be contiguous uint8/int8 [N, bytes]");
  TORCH_CHECK(scales.dtype() == at::kFloat && scales.is_contiguous(), "scales must be contiguous float32");
  TORCH_CHECK(offset.dtype() == at::kFloat && offset.is_contiguous(), "offset must be contiguous float32");
  TORCH_CHECK(k8 % 8 == 0 && group % 8 == 0 && k8 % group == 0, "bad K/group");
  Layer L;
  L.w = static_cast<const uint8_t*>(w.data_ptr());
  L.row_bytes = w.size(1);
  L.n = w.size(0);
  // The 4-bit kernels load whole 64-weight chunks.
  TORCH_CHECK(bits == 4 ? L.row_bytes * 2 >= (k8 + 63) / 64 * 64 : L.row_bytes >= k8, "packed row too short");
  L.s = scales.data_ptr<float>();
  L.ng = k8 / group;
  L.gp = group / 8;
  L.np = k8 / 8;
  TORCH_CHECK(scales.numel() == L.n * L.ng, "scales shape mismatch");
  L.off = offset.data_ptr<float>();
  if (offset.numel() == 1) {
    L.off_row = 0;
    L.off_grp = 0;
  } else {
    TORCH_CHECK(offset.numel() == L.n * L.ng, "offset shape mismatch");
    L.off_row = L.ng;
    L.off_grp = 1;
  }
  L.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == L.n, "bad bias");
    L.bias = bias->data_ptr<float>();
  }
  return L;
}

// y[..., N] = x[..., K] @ W^T (+ bias), computed in fp32 and returned in x's dtype.
// Reshaping, dtype conversion and padding to K8 happen here rather than in Python because at
// decode every microsecond of per-call overhead is paid by ~200 linears per token.
// mode: 0 auto, 1 gemv (int16 x where gemv16_fits, else fp32 x row by row), 2 blocked dequant + register-tiled GEMM,
// 3 tiled sgemm, 4 gemv with fp32 x throughout.
at::Tensor run_linear(const Layer& L, const at::Tensor& x_in, int64_t bits, int64_t in_features,
                      int64_t k8, int64_t tile_min_m, int64_t mode) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == in_features, "expected input with ", in_features,
              " features, got ", x_in.sizes());
  at::Tensor x = x_in.reshape({-1, in_features});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (k8 != in_features) x = at::constant_pad_nd(x, {0, k8 - in_features}, 0);
  if (x.stride(1) != 1 || (x.size(0) > 1 && x.stride(0) < k8)) x = x.contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = L.n;
  auto y = at::empty({M, L.n}, x.options());
  if (M > 0) {
    if (mode == 0) mode = (M == 1 || (M <= kGemvMaxM && gemv16_fits(L))) ? 1 : (M >= tile_min_m ? 3 : 2);
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (mode == 1 && gemv16_fits(L)) {
      if (bits == 4) gemv16_batch<4>(L, xp, M, x.stride(0), yp, L.n);
      else gemv16_batch<8>(L, xp, M, x.stride(0), yp, L.n);
    } else if (mode == 1 || mode == 4) {
      for (int64_t m = 0; m < M; ++m) {
        if (bits == 4) gemv<4>(L, xp + m * x.stride(0), yp + m * L.n);
        else gemv<8>(L, xp + m * x.stride(0), yp + m * L.n);
      }
    } else if (mode == 2) {
      if (bits == 4) gemm_blocked<4>(L, xp, M, x.stride(0), yp);
      else gemm_blocked<8>(L, xp, M, x.stride(0), yp);
    } else {
      if (bits == 4) gemm_tiled<4>(L, x, y);
      else gemm_tiled<8>(L, x, y);
    }
  }
  y = y.view(out_shape);
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// A layer bound once: holds its tensors (keeping the raw pointers in Layer valid) so a call
// converts one Python argument instead of eleven.
struct Handle {
  at::Tensor w, scales, offset, bias;
  Layer L;
  int64_t bits, in_features, k8, tile_min_m;

  Handle(at::Tensor w_, at::Tensor scales_, at::Tensor offset_, c10::optional<at::Tensor> bias_,
         int64_t bits_, int64_t in_features_, int64_t k8_, int64_t group, int64_t tile_min_m_)
      : w(std::move(w_)), scales(std::move(scales_)), offset(std::move(offset_)),
        bias(bias_.has_value() ? *bias_ : at::Tensor()), bits(bits_), in_features(in_features_),
        k8(k8_), tile_min_m(tile_min_m_) {
    L = make_layer(w, scales, offset, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                   bits, k8, group);
  }

  at::Tensor forward(const at::Tensor& x) const { return run_linear(L, x, bits, in_features, k8, tile_min_m, 0); }
  at::Tensor forward_mode(const at::Tensor& x, int64_t mode) const {
    return run_linear(L, x, bits, in_features, k8, tile_min_m, mode);
  }
};

at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offset,
                      int64_t bits, int64_t k8, int64_t group) {
  const Layer L = make_layer(w, scales, offset, c10::nullopt, bits, k8, group);
  auto out = at::empty({L.n, k8}, scales.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, L.n, 16, [&](int64_t n0, int64_t n1) {
    if (bits == 4) dequant_rows<4>(L, n0, n1, o + n0 * k8, k8);
    else dequant_rows<8>(L, n0, n1, o + n0 * k8, k8);
  });
  return out;
}

}  // namespace

// Kernels run without the GIL (they touch tensors only): the server's event loop thread keeps
// streaming while the engine thread is inside a kernel.
#define kNoGil pybind11::call_guard<pybind11::gil_scoped_release>()

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Handle>(m, "QLinear")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>, int64_t, int64_t,
                          int64_t, int64_t, int64_t>())
      .def("forward", &Handle::forward, kNoGil, "y = x @ W^T + b (fp32 compute)")
      .def("forward_mode", &Handle::forward_mode, kNoGil, "forward with a forced kernel (benchmarks/tests)");
  m.def("dequantize", &dequantize, kNoGil, "dequantize packed rows to fp32");
}
