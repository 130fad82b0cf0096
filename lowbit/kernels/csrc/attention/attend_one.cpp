// Paged decode attention for a single sequence: one task per (sequence, kv head), so the heads of
// one sequence still run in parallel.
#include "paged.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// Pass 1 for GN query heads g0..g0+GN-1 (GN a template argument, so the accumulators live in
// registers): sc[g * n + (t - start)] = scale * q_g . k_t.
template <Kv T, int GN>
void scores(const PagedArgs& a, const int32_t* table, int64_t h, int64_t start, int64_t len, const float* q0,
            const float* qsum, int64_t g0, float* sc, float* scratch) {
  const int64_t D = a.D, half = D / 2, n = len - start;
  const float* qg[GN];
  float qz[GN];
#pragma GCC unroll 8
  for (int g = 0; g < GN; ++g) {
    qg[g] = q0 + (g0 + g) * a.q_s_head;
    qz[g] = 0.0f;
  }
  const bool pf_v = g0 == 0 && n * (a.row_bytes + (a.v_sz ? 8 : 0)) <= kPrefetchVBytes;
  for (int64_t t = start; t < len;) {
    const int64_t off = t % a.bs, cnt = std::min(a.bs - off, len - t);
    const int64_t blk = table[t / a.bs];
    const int64_t row0 = blk * a.bs + off;
    // as in attend_seq: the next block's K rows of head h and this block's V rows into L2 (batch 1,
    // engine decode at ~100 tokens of context: 17.8 -> 13.8 us per layer call)
    if (t + cnt < len) {
      const BlockSpan nx = block_span(a, table, t + cnt, len);
      for (int64_t j = 0; j < nx.cnt; ++j) {
        prefetch_l2(a.k + ((nx.row0 + j) * a.Hkv + h) * a.row_bytes, a.row_bytes);
        if (a.k_sz) prefetch_l2(a.k_sz + ((nx.row0 + j) * a.Hkv + h) * 2, 8);
      }
    }
    if (pf_v)
      for (int64_t j = 0; j < cnt; ++j) {
        prefetch_l2(a.v + ((row0 + j) * a.Hkv + h) * a.row_bytes, a.row_bytes);
        if (a.v_sz) prefetch_l2(a.v_sz + ((row0 + j) * a.Hkv + h) * 2, 8);
      }
    if constexpr (T == Kv::U4) {  // this block's channel ranges folded into q: scratch[g] = q_g * scale
      const uint16_t* sp = a.k_ch + ((blk * 2) * a.Hkv + h) * D;
      const uint16_t* zp = a.k_ch + ((blk * 2 + 1) * a.Hkv + h) * D;
      __m256 zacc[GN];
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) zacc[g] = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 8) {
        const __m256 sv = load8_f16(sp + i);
        const __m256 zv = load8_f16(zp + i);
#pragma GCC unroll 8
        for (int g = 0; g < GN; ++g) {
          const __m256 qv = _mm256_loadu_ps(qg[g] + i);
          _mm256_storeu_ps(scratch + g * D + i, _mm256_mul_ps(qv, sv));
          zacc[g] = _mm256_fmadd_ps(qv, zv, zacc[g]);
        }
      }
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) qz[g] = hsum(zacc[g]);
    }
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t row = (row0 + j) * a.Hkv + h;
      const uint8_t* kr = a.k + row * a.row_bytes;
      __m256 acc[GN];
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 8) {
        const __m256 kv = KvRow<T>::load(kr, i, half);
#pragma GCC unroll 8
        for (int g = 0; g < GN; ++g) {
          const float* qv = T == Kv::U4 ? scratch + g * D : qg[g];
          acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), kv, acc[g]);
        }
      }
      float* out = sc + g0 * n + (t - start) + j;
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) {
        float d = hsum(acc[g]);
        if constexpr (T == Kv::U8) d = a.k_sz[row * 2] * d + a.k_sz[row * 2 + 1] * qsum[g0 + g];
        if constexpr (T == Kv::U4) d += qz[g];
        out[g * n] = d * a.scale;
      }
    }
    t += cnt;
  }
}

// Pass 2 for GN (<= 4) query heads: acc[g, :] = sum_t w[g, t] v_t, 16 output floats per sweep
// over the keys (2 x GN accumulators in registers); quantized V also gathers sum_t w * zero_t.
template <Kv T, int GN>
void weighted_values(const PagedArgs& a, const int32_t* table, int64_t h, int64_t start, int64_t len,
                     int64_t g0, const float* sc, float* acc, float* zterm) {
  const int64_t D = a.D, half = D / 2, n = len - start;
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const bool two = d0 + 8 < D;
    __m256 r0[GN], r1[GN];
    float z[GN];
#pragma GCC unroll 4
    for (int g = 0; g < GN; ++g) {
      r0[g] = r1[g] = _mm256_setzero_ps();
      z[g] = 0.0f;
    }
    for (int64_t t = start; t < len;) {
      const int64_t off = t % a.bs, cnt = std::min(a.bs - off, len - t);
      const int64_t row0 = static_cast<int64_t>(table[t / a.bs]) * a.bs + off;
      const float* p = sc + g0 * n + (t - start);
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t row = (row0 + j) * a.Hkv + h;
        const uint8_t* vr = a.v + row * a.row_bytes;
        const __m256 v0 = KvRow<T>::load(vr, d0, half);
        const __m256 v1 = two ? KvRow<T>::load(vr, d0 + 8, half) : _mm256_setzero_ps();
        if constexpr (!kv_quantized(T)) {
#pragma GCC unroll 4
          for (int g = 0; g < GN; ++g) {
            const __m256 w = _mm256_broadcast_ss(p + g * n + j);
            r0[g] = _mm256_fmadd_ps(w, v0, r0[g]);
            r1[g] = _mm256_fmadd_ps(w, v1, r1[g]);
          }
        } else {
          const float vs = a.v_sz[row * 2], vz = a.v_sz[row * 2 + 1];
#pragma GCC unroll 4
          for (int g = 0; g < GN; ++g) {
            const float pg = p[g * n + j];
            const __m256 w = _mm256_set1_ps(pg * vs);
            r0[g] = _mm256_fmadd_ps(w, v0, r0[g]);
            r1[g] = _mm256_fmadd_ps(w, v1, r1[g]);
            z[g] += pg * vz;
          }
        }
      }
      t += cnt;
    }
#pragma GCC unroll 4
    for (int g = 0; g < GN; ++g) {
      _mm256_storeu_ps(acc + (g0 + g) * D + d0, r0[g]);
      if (two) _mm256_storeu_ps(acc + (g0 + g) * D + d0 + 8, r1[g]);
      if (d0 == 0) zterm[g0 + g] = z[g];
    }
  }
}

}  // namespace

template <Kv T>
void attend_one(const PagedArgs& a, int64_t b, int64_t h, std::vector<float>& buf) {
  const int64_t D = a.D, G = a.G;
  const int64_t len = a.lens[b];
  const int64_t start = a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
  const int64_t n = len - start;
  float* out0 = a.out + (b * a.Hkv * G + h * G) * D;
  if (n <= 0) {
    std::fill(out0, out0 + G * D, 0.0f);
    return;
  }
  buf.resize(static_cast<size_t>(G * n + G * D + 3 * G + 8 * D));
  float* sc = buf.data();     // [G, n] scores, then softmax weights
  float* acc = sc + G * n;    // [G, D] weighted sums of V
  float* qsum = acc + G * D;  // [G] sum of q (quantized pools: the zero-point term)
  float* inv = qsum + G;      // [G] 1 / softmax denominator
  float* zterm = inv + G;     // [G] sum_t p_t zero_t (quantized V)
  float* scratch = zterm + G; // [8, D] int4: q * this block's K scales
  const int32_t* table = a.tables + b * a.max_blocks;
  const float* q0 = a.q + b * a.q_s_tok + h * G * a.q_s_head;
  for (int64_t g = 0; g < G; ++g) {
    float s = 0;
    if constexpr (T == Kv::U8) {
      const float* qg = q0 + g * a.q_s_head;
      for (int64_t i = 0; i < D; ++i) s += qg[i];
    }
    qsum[g] = s;
    zterm[g] = 0.0f;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: scores<T, 1>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      case 2: scores<T, 2>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      case 3: scores<T, 3>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      case 4: scores<T, 4>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      case 5: scores<T, 5>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      case 6: scores<T, 6>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      case 7: scores<T, 7>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
      default: scores<T, 8>(a, table, h, start, len, q0, qsum, g0, sc, scratch); break;
    }
  }
  softmax_rows(sc, G, n, inv);  // unnormalised weights; the denominator divides at the end
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (std::min<int64_t>(4, G - g0)) {
      case 1: weighted_values<T, 1>(a, table, h, start, len, g0, sc, acc, zterm); break;
      case 2: weighted_values<T, 2>(a, table, h, start, len, g0, sc, acc, zterm); break;
      case 3: weighted_values<T, 3>(a, table, h, start, len, g0, sc, acc, zterm); break;
      default: weighted_values<T, 4>(a, table, h, start, len, g0, sc, acc, zterm); break;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m256 iv = _mm256_set1_ps(inv[g]), zv = _mm256_set1_ps(zterm[g]);
    for (int64_t i = 0; i < D; i += 8)
      _mm256_storeu_ps(out0 + g * D + i, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(acc + g * D + i), zv), iv));
  }
}

template void attend_one<Kv::F32>(const PagedArgs&, int64_t, int64_t, std::vector<float>&);
template void attend_one<Kv::U8>(const PagedArgs&, int64_t, int64_t, std::vector<float>&);
template void attend_one<Kv::U4>(const PagedArgs&, int64_t, int64_t, std::vector<float>&);
template void attend_one<Kv::BF16>(const PagedArgs&, int64_t, int64_t, std::vector<float>&);

}  // namespace lowbit::LOWBIT_ISA
