// Dynamic per-token symmetric int8 quantization of activations (see int8.h for the scheme). A row
// holding NaN or Inf gets codes 0 and a NaN scale, so the linear's output row is NaN, as fp32's would be.
// The multiply by 127 / max|x| and vcvtps2dq's round-to-nearest-even match the torch reference
// (lowbit/kernels/ref.py quantize_per_token) bit for bit.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../api.h"
#include "int8.h"

namespace lowbit::LOWBIT_ISA {

float quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mv = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, v));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps would drop a NaN
  }
  float amax = hmax(mv);
  bool nan = _mm256_movemask_ps(bad) != 0;
  for (; k < K; ++k) {
    amax = std::max(amax, std::fabs(x[k]));
    nan |= std::isnan(x[k]);
  }
  if (nan || !std::isfinite(amax)) {  // a non-finite row: codes 0 and a NaN scale, so NaN reaches the output
    std::fill(q, q + Kp, int8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  // Four 8-float pieces -> 32 int8: packs interleaves 128-bit halves, the permute restores order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv));
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(b, order));
  }
  for (; k < K; ++k) {
    const float v = std::nearbyint(x[k] * inv);  // the default rounding mode: to nearest even
    q[k] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
  }
  for (; k < Kp; ++k) q[k] = 0;
  return amax / 127.0f;
}

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int8_t* q, float* scales) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) scales[m] = quantize_row(x + m * ldx, K, Kp, q + m * Kp);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 1, "quantize_per_token: expected at least one dimension");
  const int64_t K = x_in.size(-1);
  at::Tensor x = x_in.reshape({-1, K});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (x.stride(-1) != 1) x = x.contiguous();
  const int64_t M = x.size(0);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto s = at::empty({M}, x.options());
  if (M > 0 && K > 0) {
    quantize_rows(x.data_ptr<float>(), M, K, x.stride(0), K, q.data_ptr<int8_t>(), s.data_ptr<float>());
  } else if (M > 0) {
    s.zero_();
  }
  std::vector<int64_t> lead(x_in.sizes().begin(), x_in.sizes().end() - 1);
  std::vector<int64_t> qshape = lead;
  qshape.push_back(K);
  return {q.view(qshape), s.view(lead)};
}

}  // namespace lowbit::LOWBIT_ISA
