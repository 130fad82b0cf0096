// Paged decode attention for several sequences: one task per sequence, its blocks read front to
// back across the kv heads, accumulators sized to the register file.
#include <cmath>

#include "paged.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// Sums of R accumulators into d[0..R): one hadd tree for four, hsum each otherwise.
template <int R>
inline void hsum_rows(const __m256* acc, float* d) {
  if constexpr (R == 4) {
    _mm_storeu_ps(d, hsum4(acc[0], acc[1], acc[2], acc[3]));
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) d[r] = hsum(acc[r]);
  }
}

// K rows row .. row + R - 1 of kv head h in the pool.
template <int R>
inline void k_rows(const PagedArgs& a, int64_t row, int64_t h, const uint8_t** kr) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) kr[r] = a.k + ((row + r) * a.Hkv + h) * a.row_bytes;
}

// Rows of K scored per sweep (R) and 8-float slices of D accumulated per sweep over V (NV), sized
// so the GN x R (pass 1) and GN x NV (pass 2) accumulators stay in the 16 ymm registers.
template <int GN>
constexpr int rows_per_sweep() { return GN <= 3 ? 4 : (GN <= 6 ? 2 : 1); }
template <int GN>
constexpr int rows_per_sweep_i16() { return GN <= 2 ? 4 : (GN <= 4 ? 2 : 1); }
template <int GN>
constexpr int slices_per_sweep() { return GN <= 3 ? 4 : (GN == 4 ? 3 : (GN <= 6 ? 2 : 1)); }

// Pass 1 for kv head h, R consecutive rows of one block starting at pool row `row`:
// sc[(h GN + g) n + idx + r] = scale * q_g . k_r. GN x R independent FMA chains (a single row's
// GN chains would wait on FMA latency), reduced four rows at a time.
template <Kv T, int GN, int R>
inline void score_rows(const PagedArgs& a, const float* qh, int64_t qstride, int64_t row, int64_t h, int64_t idx,
                       int64_t n, const float* qsum, const float* qz, float* sc) {
  const int64_t D = a.D, half = D / 2, Hkv = a.Hkv;
  const uint8_t* kr[R];
  k_rows<R>(a, row, h, kr);
  __m256 acc[GN][R];
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[g][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {
    __m256 kv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) kv[r] = KvRow<T>::load(kr[r], i, half);
#pragma GCC unroll 8
    for (int g = 0; g < GN; ++g) {
      const __m256 qv = _mm256_loadu_ps(qh + g * qstride + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[g][r] = _mm256_fmadd_ps(qv, kv[r], acc[g][r]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) {
    const int64_t j = h * GN + g;
    float d[R];
    hsum_rows<R>(acc[g], d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float v = d[r];
      if constexpr (T == Kv::U8) {
        const int64_t kr_i = ((row + r) * Hkv + h) * 2;
        v = a.k_sz[kr_i] * v + a.k_sz[kr_i + 1] * qsum[j];
      }
      if constexpr (T == Kv::U4) v += qz[j];
      sc[j * n + idx + r] = v * a.scale;
    }
  }
}

// Pass 1 for int8 K, R rows: q was rounded to int16 per head (qi, step qstep[j]), so q . codes is
// an exact integer sum: 16 products per vpmaddwd where the float path converts codes to fp32 and
// does 8 per FMA. The int32 sums cannot overflow: |q| <= qmax and D * 255 * qmax < 2^31 (qmax
// chosen by the caller). Rounding q to 16 bits moves a score by ~1e-5 of |q| |k|, far below
// the int8 rounding of K itself.
template <int GN, int R>
inline void score_rows_i16(const PagedArgs& a, const int16_t* qi, const float* qstep, int64_t row, int64_t h,
                           int64_t idx, int64_t n, const float* qsum, float* sc) {
  const int64_t D = a.D, Hkv = a.Hkv;
  const uint8_t* kr[R];
  k_rows<R>(a, row, h, kr);
  __m256i acc[GN][R];
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[g][r] = _mm256_setzero_si256();
  const int16_t* qh = qi + h * GN * D;
  for (int64_t i = 0; i < D; i += 16) {
    __m256i c[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) c[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr[r] + i)));
#pragma GCC unroll 8
    for (int g = 0; g < GN; ++g) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + g * D + i));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[g][r] = _mm256_add_epi32(acc[g][r], _mm256_madd_epi16(c[r], qv));
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) {
    const int64_t j = h * GN + g;
    __m256 accf[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) accf[r] = _mm256_cvtepi32_ps(acc[g][r]);
    float d[R];
    hsum_rows<R>(accf, d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t ki = ((row + r) * Hkv + h) * 2;
      sc[j * n + idx + r] = (a.k_sz[ki] * qstep[j] * d[r] + a.k_sz[ki + 1] * qsum[j]) * a.scale;
    }
  }
}

// Pass 2 for kv head h and NV 8-float slices of D from d0: out[h GN + g, d0 : d0 + 8 NV] =
// (sum_t w[g, t] v_t + zterm) / denominator, the accumulators in registers for the whole sweep
// over the context (V rows are re-read per slice from L1/L2, never a read-modify-write of a
// memory accumulator per row).
template <Kv T, int GN, int NV>
inline void value_slice(const PagedArgs& a, const int32_t* table, int64_t h, int64_t d0, int64_t start, int64_t len,
                        const float* sc, const float* inv, float* zterm, float* out0) {
  const int64_t D = a.D, half = D / 2, Hkv = a.Hkv, n = len - start;
  __m256 acc[GN][NV];
  float z[GN];
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) {
    z[g] = 0.0f;
#pragma GCC unroll 4
    for (int s = 0; s < NV; ++s) acc[g][s] = _mm256_setzero_ps();
  }
  const float* p0 = sc + h * GN * n;
  for (int64_t t = start; t < len;) {
    const int64_t off = t % a.bs, cnt = std::min(a.bs - off, len - t);
    const int64_t row0 = static_cast<int64_t>(table[t / a.bs]) * a.bs + off;
    for (int64_t r = 0; r < cnt; ++r) {
      const int64_t row = (row0 + r) * Hkv + h, idx = t - start + r;
      const uint8_t* vr = a.v + row * a.row_bytes;
      __m256 vv[NV];
#pragma GCC unroll 4
      for (int s = 0; s < NV; ++s) vv[s] = KvRow<T>::load(vr, d0 + 8 * s, half);
      float vs = 1.0f;
      if constexpr (kv_quantized(T)) vs = a.v_sz[row * 2];
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) {
        const float p = p0[g * n + idx];
        const __m256 w = _mm256_set1_ps(p * vs);
#pragma GCC unroll 4
        for (int s = 0; s < NV; ++s) acc[g][s] = _mm256_fmadd_ps(w, vv[s], acc[g][s]);
        if constexpr (kv_quantized(T)) z[g] += p * a.v_sz[row * 2 + 1];
      }
    }
    t += cnt;
  }
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) {
    const int64_t j = h * GN + g;
    if (d0 == 0) zterm[j] = z[g];
    const __m256 iv = _mm256_set1_ps(inv[j]), zv = _mm256_set1_ps(zterm[j]);
#pragma GCC unroll 4
    for (int s = 0; s < NV; ++s)
      _mm256_storeu_ps(out0 + j * D + d0 + 8 * s, _mm256_mul_ps(_mm256_add_ps(acc[g][s], zv), iv));
  }
}

// One sequence, every head (GN = query heads per kv head, a template argument). Pass 1 walks the
// blocks in table order and, inside a block, each kv head's rows R at a time (a block's rows for
// all heads are one contiguous stretch of the pool, so the reads stay sequential); pass 2 sweeps
// the context once per (kv head, slice of D) with register accumulators.
template <Kv T, int GN>
void attend_seq(const PagedArgs& a, int64_t b, std::vector<float>& buf) {
  constexpr int R = rows_per_sweep<GN>();
  constexpr int NV = slices_per_sweep<GN>();
  const int64_t D = a.D, Hkv = a.Hkv, Hq = Hkv * GN;
  const int64_t len = a.lens[b];
  const int64_t start = a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
  const int64_t n = len - start;
  float* out0 = a.out + b * Hq * D;
  if (n <= 0) {
    std::fill(out0, out0 + Hq * D, 0.0f);
    return;
  }
  buf.resize(static_cast<size_t>(Hq * n + Hq * D + 5 * Hq + (Hq * D + 1) / 2));
  float* sc = buf.data();      // [Hq, n] scores, then softmax weights
  float* qs = sc + Hq * n;     // [Hq, D] int4: q * this block's K scales
  float* qsum = qs + Hq * D;   // [Hq] int8: sum of q
  float* qz = qsum + Hq;       // [Hq] int4: q . this block's K zeros
  float* inv = qz + Hq;        // [Hq] 1 / softmax denominator
  float* zterm = inv + Hq;     // [Hq] sum_t p_t zero_t (quantized V)
  float* qstep = zterm + Hq;   // [Hq] int8: step of q's int16 rounding
  int16_t* qi = reinterpret_cast<int16_t*>(qstep + Hq);  // [Hq, D] int8: q rounded to int16
  const int32_t* table = a.tables + b * a.max_blocks;
  const float* qb = a.q + b * a.q_s_tok;
  const float qmax = static_cast<float>(std::min<int64_t>(32767, 2147483647 / (D * 255)));
  for (int64_t j = 0; j < Hq; ++j) {
    float s = 0;
    if constexpr (T == Kv::U8) {
      const float* qj = qb + j * a.q_s_head;
      float m = 0;
      for (int64_t i = 0; i < D; ++i) {
        s += qj[i];
        m = std::max(m, std::fabs(qj[i]));
      }
      // a non-finite q gives non-finite scores through qsum, as the float path would; its codes are
      // kept in range only so the int16 conversion is defined
      const float step = m > 0 && std::isfinite(m) ? m / qmax : 1.0f;
      for (int64_t i = 0; i < D; ++i) {
        const float v = qj[i] / step;
        qi[j * D + i] = std::isfinite(v) ? static_cast<int16_t>(std::nearbyint(std::clamp(v, -qmax, qmax))) : 0;
      }
      qstep[j] = step;
    }
    qsum[j] = s;
    zterm[j] = 0.0f;
  }
  // Pass 1: scores.
  // Software prefetch into L2, one block ahead of the demand reads: the blocks are scattered over
  // the pool (~12 KiB fp32 / 3 KiB int8 each), so the hardware prefetcher restarts at every block and
  // a cold decode step would wait on DRAM at each one. While this block's K is scored: the next
  // block's K (and int8 scales) and this block's V, which pass 2 then finds in L2, when the whole
  // context's V fits there (measured, 64 sequences x 192 tokens, all 30 layers cold: fp32 1.38 ->
  // 0.94-1.02 ms, int8 0.70 -> 0.46-0.49 ms per layer call).
  const bool pf_v = n * Hkv * (a.row_bytes + (a.v_sz ? 8 : 0)) <= kPrefetchVBytes;
  for (int64_t t = start; t < len;) {
    const int64_t off = t % a.bs, cnt = std::min(a.bs - off, len - t);
    const int64_t blk = table[t / a.bs];
    const int64_t row0 = blk * a.bs + off;
    const uint8_t* pk = nullptr;  // next block's K, prefetched a kv head's share at a time below
    int64_t pk_bytes = 0;
    if (t + cnt < len) {
      const BlockSpan nx = block_span(a, table, t + cnt, len);
      pk = a.k + nx.row0 * Hkv * a.row_bytes;
      pk_bytes = nx.cnt * Hkv * a.row_bytes;
      if (a.k_sz) prefetch_l2(a.k_sz + nx.row0 * Hkv * 2, nx.cnt * Hkv * 8);
    }
    const uint8_t* pv = pf_v ? a.v + row0 * Hkv * a.row_bytes : nullptr;
    const int64_t pv_bytes = cnt * Hkv * a.row_bytes;
    if (pf_v && a.v_sz) prefetch_l2(a.v_sz + row0 * Hkv * 2, cnt * Hkv * 8);
    const int64_t pk_share = (pk_bytes / Hkv + 63) / 64 * 64, pv_share = (pv_bytes / Hkv + 63) / 64 * 64;
    if constexpr (T == Kv::U4) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const uint16_t* sp = a.k_ch + ((blk * 2) * Hkv + h) * D;
        const uint16_t* zp = a.k_ch + ((blk * 2 + 1) * Hkv + h) * D;
        for (int g = 0; g < GN; ++g) {
          const int64_t j = h * GN + g;
          __m256 za = _mm256_setzero_ps();
          for (int64_t i = 0; i < D; i += 8) {
            const __m256 qv = _mm256_loadu_ps(qb + j * a.q_s_head + i);
            _mm256_storeu_ps(qs + j * D + i, _mm256_mul_ps(qv, load8_f16(sp + i)));
            za = _mm256_fmadd_ps(qv, load8_f16(zp + i), za);
          }
          qz[j] = hsum(za);
        }
      }
    }
    const int64_t qstride = T == Kv::U4 ? D : a.q_s_head;
    for (int64_t h = 0; h < Hkv; ++h) {
      // spread over the heads, so the prefetches do not all wait for line-fill buffers at once
      if (pk) prefetch_l2(pk + h * pk_share, std::min(pk_share, pk_bytes - h * pk_share));
      if (pv) prefetch_l2(pv + h * pv_share, std::min(pv_share, pv_bytes - h * pv_share));
      const float* qh = T == Kv::U4 ? qs + h * GN * D : qb + h * GN * a.q_s_head;
      const int64_t idx0 = t - start;
      int64_t r = 0;
      if constexpr (T == Kv::U8) {
        if (D % 16 == 0) {
          constexpr int RI = rows_per_sweep_i16<GN>();
          for (; r + RI <= cnt; r += RI) score_rows_i16<GN, RI>(a, qi, qstep, row0 + r, h, idx0 + r, n, qsum, sc);
          for (; r < cnt; ++r) score_rows_i16<GN, 1>(a, qi, qstep, row0 + r, h, idx0 + r, n, qsum, sc);
        }
      }
      for (; r + R <= cnt; r += R) score_rows<T, GN, R>(a, qh, qstride, row0 + r, h, idx0 + r, n, qsum, qz, sc);
      for (; r < cnt; ++r) score_rows<T, GN, 1>(a, qh, qstride, row0 + r, h, idx0 + r, n, qsum, qz, sc);
    }
    t += cnt;
  }
  softmax_rows(sc, Hq, n, inv);
  // Pass 2: weighted sums of V, written out normalised.
  const int64_t nvec = D / 8;
  for (int64_t h = 0; h < Hkv; ++h) {
    int64_t s = 0;
    for (; s + NV <= nvec; s += NV) value_slice<T, GN, NV>(a, table, h, 8 * s, start, len, sc, inv, zterm, out0);
    for (; s < nvec; ++s) value_slice<T, GN, 1>(a, table, h, 8 * s, start, len, sc, inv, zterm, out0);
  }
}

}  // namespace

template <Kv T>
void attend_seq_dispatch(const PagedArgs& a, int64_t b, std::vector<float>& buf) {
  switch (a.G) {
    case 1: attend_seq<T, 1>(a, b, buf); break;
    case 2: attend_seq<T, 2>(a, b, buf); break;
    case 3: attend_seq<T, 3>(a, b, buf); break;
    case 4: attend_seq<T, 4>(a, b, buf); break;
    case 5: attend_seq<T, 5>(a, b, buf); break;
    case 6: attend_seq<T, 6>(a, b, buf); break;
    case 7: attend_seq<T, 7>(a, b, buf); break;
    default: attend_seq<T, 8>(a, b, buf); break;
  }
}

template void attend_seq_dispatch<Kv::F32>(const PagedArgs&, int64_t, std::vector<float>&);
template void attend_seq_dispatch<Kv::U8>(const PagedArgs&, int64_t, std::vector<float>&);
template void attend_seq_dispatch<Kv::U4>(const PagedArgs&, int64_t, std::vector<float>&);
template void attend_seq_dispatch<Kv::BF16>(const PagedArgs&, int64_t, std::vector<float>&);

}  // namespace lowbit::LOWBIT_ISA
