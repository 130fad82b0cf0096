// W8A8: y = (x_q . w) * x_scale[m] * w_scale[n] + bias[n], x quantized per token here, w int8
// symmetric per output channel in the panel layout of int8.h. AVX2: vpsignb + vpmaddubsw + vpmaddwd
// (the sign trick); AVX-512 VNNI: vpdpbusd on x + 128 with the 128 * rowsum(w) correction.
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

#include "../api.h"
#include "int8.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// What a tile needs: the activation codes (in the form this ISA's product wants), their scales,
// the packed weight and the per-channel epilogue, padded to whole panels.
struct W8Args {
  const int8_t* w;       // [P, Kp/4, 16, 4]
  const uint8_t* xa;     // AVX2: |q| [M, Kp]; VNNI: q + 128 [M, Kp]
  const int8_t* xq;      // q [M, Kp] (AVX2 sign source)
  const float* xs;       // [M]
  const float* ws;       // [16P]
  const float* bias;     // [N] or nullptr
  const int32_t* rowsum; // [16P]
  int64_t Kp, N;
  float* y;              // [M, N]
};

// out = fma(float(acc) * xs, ws, bias) for 8 channels: the product by ws and the bias add rounded once,
// written as an FMA so no compiler choice (-ffp-contract) changes the bits; layers/linear_int8.py's
// oneDNN route computes the same (torch.addcmul).
inline __m256 epilogue8(__m256i acc, float xs, const float* ws, const float* b) {
  const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(xs));
  return _mm256_fmadd_ps(t, _mm256_loadu_ps(ws), _mm256_loadu_ps(b));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int MR>
void tile(const W8Args& a, int64_t p, int64_t m0) {
  const int64_t nq = a.Kp / 4;
  const int8_t* w = a.w + p * nq * 64;
  __m512i acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t t = 0; t < nq; ++t) {
    const __m512i wv = _mm512_loadu_si512(w + 64 * t);
    for (int r = 0; r < MR; ++r) {
      const __m512i xb = _mm512_set1_epi32(load_i32(a.xa + (m0 + r) * a.Kp + 4 * t));
      acc[r] = _mm512_dpbusd_epi32(acc[r], xb, wv);
    }
  }
  const int64_t n0 = p * kPanel;
  alignas(32) float btmp[16];
  const float* bias = panel_bias(a.bias, n0, a.N, btmp);
  const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(a.rowsum + n0), 7);  // 128 * rowsum
  for (int r = 0; r < MR; ++r) {
    alignas(64) int32_t lanes[16];
    _mm512_store_si512(lanes, _mm512_sub_epi32(acc[r], corr));
    alignas(32) float out[16];
    const float xs = a.xs[m0 + r];
    _mm256_store_ps(out, epilogue8(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)), xs, a.ws + n0, bias));
    _mm256_store_ps(out + 8, epilogue8(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes + 8)), xs, a.ws + n0 + 8,
                                       bias + 8));
    store_panel(a.y + (m0 + r) * a.N + n0, out, a.N - n0);
  }
}
constexpr bool kVnni = true;
#else
template <int MR>
void tile(const W8Args& a, int64_t p, int64_t m0) {
  const int64_t nq = a.Kp / 4;
  const int8_t* w = a.w + p * nq * 64;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t t = 0; t < nq; ++t) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * t));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * t + 32));
    for (int r = 0; r < MR; ++r) {
      const int64_t o = (m0 + r) * a.Kp + 4 * t;
      const __m256i xa = _mm256_set1_epi32(load_i32(a.xa + o));  // |x| quad, u8
      const __m256i xq = _mm256_set1_epi32(load_i32(a.xq + o));  // x quad, its signs
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, xq)), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, xq)), ones));
    }
  }
  const int64_t n0 = p * kPanel;
  alignas(32) float btmp[16];
  const float* bias = panel_bias(a.bias, n0, a.N, btmp);
  for (int r = 0; r < MR; ++r) {
    alignas(32) float out[16];
    const float xs = a.xs[m0 + r];
    _mm256_store_ps(out, epilogue8(acc[r][0], xs, a.ws + n0, bias));
    _mm256_store_ps(out + 8, epilogue8(acc[r][1], xs, a.ws + n0 + 8, bias + 8));
    store_panel(a.y + (m0 + r) * a.N + n0, out, a.N - n0);
  }
}
constexpr bool kVnni = false;
#endif

// The second activation buffer the product needs: |q| (AVX2) or q + 128 (VNNI), both as u8.
void derive_x(const int8_t* q, int64_t n, uint8_t* out) {
  int64_t i = 0;
  if constexpr (kVnni) {
    const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
    for (; i + 32 <= n; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_xor_si256(v, bias));
    }
    for (; i < n; ++i) out[i] = static_cast<uint8_t>(q[i] + 128);
  } else {
    for (; i + 32 <= n; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_abs_epi8(v));
    }
    for (; i < n; ++i) out[i] = static_cast<uint8_t>(q[i] < 0 ? -q[i] : q[i]);
  }
}

}  // namespace

// Bias: float32 [N] or none (the panel epilogue pads it, int8.h panel_bias).
const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
              "bias must be contiguous float32 [", N, "]");
  return bias->data_ptr<float>();
}

at::Tensor w8a8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& w_scale,
                       const at::Tensor& rowsum, const c10::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == kPanel &&
                  packed.size(3) == 4 && packed.is_contiguous(),
              "w8a8_linear: packed weight must be contiguous int8 [P, Kp/4, 16, 4]");
  const int64_t P = packed.size(0), Kp = packed.size(1) * 4, Np = P * kPanel, N = out_features;
  TORCH_CHECK(N > 0 && N <= Np && N > Np - kPanel, "w8a8_linear: out_features ", N, " does not fit ", P, " panels");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == Np,
              "w8a8_linear: w_scale must be contiguous float32 [", Np, "] (padded to whole panels)");
  TORCH_CHECK(rowsum.scalar_type() == at::kInt && rowsum.is_contiguous() && rowsum.numel() == Np,
              "w8a8_linear: rowsum must be contiguous int32 [", Np, "]");
  const at::Tensor x = input_rows(x_in, Kp, "w8a8_linear");
  const int64_t K = x.size(1), M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M > 0) {
    auto q = at::empty({M, Kp}, x.options().dtype(at::kChar));
    auto xa = at::empty({M, Kp}, x.options().dtype(at::kByte));
    auto xs = at::empty({M}, x.options());
    quantize_rows(x.data_ptr<float>(), M, K, x.stride(0), Kp, q.data_ptr<int8_t>(), xs.data_ptr<float>());
    derive_x(q.data_ptr<int8_t>(), M * Kp, xa.data_ptr<uint8_t>());
    const W8Args a{packed.data_ptr<int8_t>(), xa.data_ptr<uint8_t>(), q.data_ptr<int8_t>(), xs.data_ptr<float>(),
                   w_scale.data_ptr<float>(), bias_ptr(bias, N), rowsum.data_ptr<int32_t>(), Kp, N,
                   y.data_ptr<float>()};
    over_panels(M, P, Kp, [&](int64_t p, int64_t m0, int64_t rows) {
      with_rows<kMR>(rows, [&](auto mr) { tile<decltype(mr)::value>(a, p, m0); });
    });
  }
  return like_input(y, x_in);
}

}  // namespace lowbit::LOWBIT_ISA
