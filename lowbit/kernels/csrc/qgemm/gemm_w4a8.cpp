// W4A8: y = sum_g x_scale[m,g] * (s[n,g] * (x_q . q)_g - z[n,g] s[n,g] * sum_g(x_q)) + bias[n], with x
// quantized here per token and per weight group (one int8 scale per token and group: the group's
// int32 sum is scaled anyway, so this costs one FMA per group, and an outlier channel coarsens only
// its own group; per token alone cost the default model 3-4% perplexity, per group 0.2%), and the 4-bit codes expanded to bytes in the inner loop (one mask or
// shift + mask per 32 codes): the packed weight is read once per row tile, never dequantized to memory.
// The codes (0..15) are the unsigned operand as they are, so neither the sign trick nor a +128
// correction is needed; the zero point costs one FMA per group and tile row.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../api.h"
#include "int8.h"

namespace lowbit::LOWBIT_ISA {
namespace {

struct W4Args {
  const uint8_t* w;    // [P, Kp/8, 64]
  const float* s;      // [P, ng, 16]
  const float* zs;     // [P, ng, 16] zero * scale
  const int8_t* xq;    // [M, Kp]
  const float* xsum;   // [M, ng] per-group sums of xq
  const float* xs;     // [M, ng] per-group activation scales
  const float* bias;   // [N] or nullptr
  int64_t Kp, ng, gq, N;  // gq: 8-weight blocks per group
  float* y;
};

// acc_f[r][0..16) += xs * (s * float(dot) - zs * xsum) for one group of one tile row.
inline void group_update(float* accf, __m256i d0, __m256i d1, const float* s, const float* zs, float xsum, float xs) {
  const __m256 xv = _mm256_set1_ps(xsum), sv = _mm256_set1_ps(xs);
  const __m256 t0 = _mm256_fnmadd_ps(_mm256_loadu_ps(zs), xv, _mm256_mul_ps(_mm256_cvtepi32_ps(d0), _mm256_loadu_ps(s)));
  const __m256 t1 =
      _mm256_fnmadd_ps(_mm256_loadu_ps(zs + 8), xv, _mm256_mul_ps(_mm256_cvtepi32_ps(d1), _mm256_loadu_ps(s + 8)));
  _mm256_storeu_ps(accf, _mm256_fmadd_ps(t0, sv, _mm256_loadu_ps(accf)));
  _mm256_storeu_ps(accf + 8, _mm256_fmadd_ps(t1, sv, _mm256_loadu_ps(accf + 8)));
}

template <int MR>
void tile(const W4Args& a, int64_t p, int64_t m0) {
  const int64_t nb = a.Kp / 8;
  const uint8_t* w = a.w + p * nb * 64;
  const float* sp = a.s + p * a.ng * kPanel;
  const float* zp = a.zs + p * a.ng * kPanel;
  alignas(64) float accf[MR][16] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // the fp32 accumulators stay in registers too: 3 MR zmm of the 32 (MR <= 8)
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 accz[MR];
  for (int r = 0; r < MR; ++r) accz[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.ng; ++g) {
    // the low and high nibbles into separate accumulators: 2 * MR independent vpdpbusd chains
    __m512i acc[MR], acc_hi[MR];
    for (int r = 0; r < MR; ++r) acc[r] = acc_hi[r] = _mm512_setzero_si512();
    for (int64_t t = g * a.gq; t < (g + 1) * a.gq; ++t) {
      const __m512i v = _mm512_loadu_si512(w + 64 * t);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      for (int r = 0; r < MR; ++r) {
        const int8_t* x = a.xq + (m0 + r) * a.Kp + 8 * t;
        acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(load_i32(x)));
        acc_hi[r] = _mm512_dpbusd_epi32(acc_hi[r], hi, _mm512_set1_epi32(load_i32(x + 4)));
      }
    }
    // accz += xs * (s * dot - zs * xsum), group_update's arithmetic on 16 lanes at once
    const __m512 sv = _mm512_loadu_ps(sp + g * kPanel), zv = _mm512_loadu_ps(zp + g * kPanel);
    for (int r = 0; r < MR; ++r) {
      const int64_t i = (m0 + r) * a.ng + g;
      const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[r], acc_hi[r]));
      const __m512 t = _mm512_fnmadd_ps(zv, _mm512_set1_ps(a.xsum[i]), _mm512_mul_ps(d, sv));
      accz[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(a.xs[i]), accz[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_store_ps(accf[r], accz[r]);
#else
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < a.ng; ++g) {
    __m256i acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t t = g * a.gq; t < (g + 1) * a.gq; ++t) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * t));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * t + 32));
      const __m256i lo0 = _mm256_and_si256(v0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
      const __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
      for (int r = 0; r < MR; ++r) {
        const int8_t* x = a.xq + (m0 + r) * a.Kp + 8 * t;
        const __m256i xe = _mm256_set1_epi32(load_i32(x)), xo = _mm256_set1_epi32(load_i32(x + 4));
        // two quads of pairs, at most 2 * 3810 in int16, then widened once
        const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xe), _mm256_maddubs_epi16(hi0, xo));
        const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xe), _mm256_maddubs_epi16(hi1, xo));
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
      }
    }
    for (int r = 0; r < MR; ++r)
      group_update(accf[r], acc[r][0], acc[r][1], sp + g * kPanel, zp + g * kPanel, a.xsum[(m0 + r) * a.ng + g],
                   a.xs[(m0 + r) * a.ng + g]);
  }
#endif
  const int64_t n0 = p * kPanel;
  alignas(32) float btmp[16];
  const float* bias = panel_bias(a.bias, n0, a.N, btmp);
  for (int r = 0; r < MR; ++r) {
    alignas(32) float out[16];
    _mm256_store_ps(out, _mm256_add_ps(_mm256_load_ps(accf[r]), _mm256_loadu_ps(bias)));
    _mm256_store_ps(out + 8, _mm256_add_ps(_mm256_load_ps(accf[r] + 8), _mm256_loadu_ps(bias + 8)));
    store_panel(a.y + (m0 + r) * a.N + n0, out, a.N - n0);
  }
}

}  // namespace

at::Tensor w4a8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zero_scales, const c10::optional<at::Tensor>& bias, int64_t out_features,
                       int64_t group) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              "w4a8_linear: packed weight must be contiguous uint8 [P, Kp/8, 64]");
  const int64_t P = packed.size(0), Kp = packed.size(1) * 8, Np = P * kPanel, N = out_features;
  TORCH_CHECK(N > 0 && N <= Np && N > Np - kPanel, "w4a8_linear: out_features ", N, " does not fit ", P, " panels");
  TORCH_CHECK(group > 0 && group % 8 == 0 && Kp % group == 0, "w4a8_linear: group ", group,
              " must be a multiple of 8 dividing the padded K ", Kp);
  const int64_t ng = Kp / group;
  for (const at::Tensor* t : {&scales, &zero_scales})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == P &&
                    t->size(1) == ng && t->size(2) == kPanel,
                "w4a8_linear: scales and zero_scales must be contiguous float32 [", P, ", ", ng, ", 16]");
  const at::Tensor x = input_rows(x_in, Kp, "w4a8_linear");
  const int64_t K = x.size(1), M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M > 0) {
    auto q = at::empty({M, Kp}, x.options().dtype(at::kChar));
    auto xs = at::empty({M, ng}, x.options());
    auto xsum = at::empty({M, ng}, x.options());
    int8_t* qp = q.data_ptr<int8_t>();
    float* xsp = xs.data_ptr<float>();
    float* sp = xsum.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    const int64_t ldx = x.stride(0);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / Kp), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t g = 0; g < ng; ++g) {  // each group of the token on its own scale; padding codes 0
          const int64_t k0 = g * group, real = std::clamp<int64_t>(K - k0, 0, group);
          int8_t* qg = qp + m * Kp + k0;
          xsp[m * ng + g] = quantize_row(xp + m * ldx + k0, real, group, qg);
          int32_t s = 0;
          for (int64_t k = 0; k < group; ++k) s += qg[k];
          sp[m * ng + g] = static_cast<float>(s);
        }
    });
    const W4Args a{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zero_scales.data_ptr<float>(), qp, sp,
                   xs.data_ptr<float>(), bias_ptr(bias, N), Kp, ng, group / 8, N, y.data_ptr<float>()};
    over_panels(M, P, Kp, [&](int64_t p, int64_t m0, int64_t rows) {
      with_rows<kMR>(rows, [&](auto mr) { tile<decltype(mr)::value>(a, p, m0); });
    });
  }
  return like_input(y, x_in);
}

}  // namespace lowbit::LOWBIT_ISA
