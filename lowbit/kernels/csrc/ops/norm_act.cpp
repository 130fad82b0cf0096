// RMSNorm, the residual add fused with the next RMSNorm, and the MLP's SiLU * up.
#include <ATen/ops/empty.h>

#include <cmath>

#include "../api.h"
#include "../common/vec.h"
#include "views.h"

namespace lowbit::LOWBIT_ISA {
namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, n] with unit last stride");
}

// ------------------------------------------------------------------------------- RMSNorm
// out = w * (x * rsqrt(mean(x^2) + eps)), the reference order (normalise, then scale).
inline void rms_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(u, u, a0);
    a1 = _mm256_fmadd_ps(v, v, a1);
  }
  float ss = hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), rv)));
  for (; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1), "bad norm weight");
  const int64_t M = x.size(0), n = x.size(1), xs = x.stride(0);
  auto out = at::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, grain_for(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * xs, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

// residual += x (in place), returns rms_norm(residual): the residual add of one sublayer fused
// with the norm that opens the next.
at::Tensor fused_add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual shapes differ: ", x.sizes(), " vs ", residual.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1), "bad norm weight");
  const int64_t M = x.size(0), n = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  auto out = at::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, grain_for(2 * n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* h = rp + r * rs;
      const float* a = xp + r * xs;
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(a + i)));
      for (; i < n; ++i) h[i] += a[i];
      rms_row(h, wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

// ------------------------------------------------------------------------------- SiLU * up
// x [M, 2I] = [gate | up] -> silu(gate) * up, silu(g) = g / (1 + e^-g).
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul needs an even last dimension, got ", x.size(1));
  const int64_t M = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  auto out = at::empty({M, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, grain_for(8 * I), [&](int64_t r0, int64_t r1) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = xp + r * xs;
      const float* u = g + I;
      float* o = op + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
    }
  });
  return out;
}

}  // namespace lowbit::LOWBIT_ISA
