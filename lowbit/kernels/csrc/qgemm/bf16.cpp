// bf16 matrix work with fp32 accumulation (EngineArgs.dtype = bfloat16): activations and weights are
// rounded to bf16 for the multiply only; everything between the linears stays fp32.
//
// Why: on CPUs with native bf16 dot products (AVX512_BF16, AMX-BF16) oneDNN's bf16 GEMM runs 3-6x
// the fp32 sgemm's rate at M >= 64 (the engine's batched decode and prefill), which is what vLLM-CPU
// runs by default. Two entry points:
//  * gemm_tiled_bf16: the packed 4/8-bit weight dequantized tile by tile straight into bf16 (never a
//    full fp32 or bf16 copy of W) and multiplied by torch's bf16 matmul (oneDNN), the tiled sgemm's
//    structure with half the scratch bytes;
//  * bf16_linear: an unquantized weight stored as bf16 (half fp32's bytes). Small M is a gemv that
//    widens bf16 to fp32 exactly (a 16-bit shift) and keeps x in fp32, streaming W once per 4 rows
//    of x; from kBf16GemmMinM rows on it is the bf16 matmul.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstring>
#include <vector>

#include "../api.h"
#include "amx.h"

namespace lowbit::LOWBIT_ISA {
namespace {

#if defined(__AVX512BF16__)
// 4-bit rows straight to bf16, for groups of a multiple of 16 weights: per group a 16-entry fp32 table
// (q * s + s * offset for q = 0..15, dequant_rows' own fma), which vpermps indexes with each weight's
// nibble (it reads only the low 4 bits of a lane, so shifting the packed words is all the unpacking),
// and 32 weights per cvtne2ps. Bit for bit dequant_rows<4> + to_bf16, in ~7 instructions per 32
// weights instead of ~20: at batch 64 the dequantization, not the tile products, bounds the AMX GEMM.
void dequant4_rows_bf16(const Layer& L, int64_t n0, int64_t n1, uint16_t* out, int64_t ld) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // 16 weights per shift vector: the low 8 lanes take nibble 2i, the high 8 nibble 2i + 1, of the 8
  // words (chunk layout in layer.h: nibble i of word j is weight 8i + j)
  const __m512i shift[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4),
      _mm512_setr_epi32(8, 8, 8, 8, 8, 8, 8, 8, 12, 12, 12, 12, 12, 12, 12, 12),
      _mm512_setr_epi32(16, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20, 20, 20, 20, 20),
      _mm512_setr_epi32(24, 24, 24, 24, 24, 24, 24, 24, 28, 28, 28, 28, 28, 28, 28, 28)};
  const int64_t quarters_per_group = L.gp / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = L.w + n * L.row_bytes;
    const float* sr = L.s + n * L.ng;
    const float* zr = L.off + n * L.off_row;
    uint16_t* o = out + (n - n0) * ld;
    int64_t g = -1, left = 0;
    __m512 table = iota;
    for (int64_t c = 0; c < L.np / 8; ++c) {
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32 * c)));
      __m512 f[4];
      for (int qd = 0; qd < 4; ++qd) {
        if (left == 0) {
          ++g;
          left = quarters_per_group;
          table = _mm512_fmadd_ps(iota, _mm512_set1_ps(sr[g]), _mm512_set1_ps(sr[g] * zr[g * L.off_grp]));
        }
        --left;
        f[qd] = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, shift[qd]), table);
      }
      const __m512bh lo = _mm512_cvtne2ps_pbh(f[1], f[0]), hi = _mm512_cvtne2ps_pbh(f[3], f[2]);
      _mm512_storeu_si512(o + 64 * c, reinterpret_cast<const __m512i&>(lo));
      _mm512_storeu_si512(o + 64 * c + 32, reinterpret_cast<const __m512i&>(hi));
    }
  }
}
#endif

// Rows [n0, n1) of W in bf16 at out[(n - n0) * k8 + k]: dequantized 16 rows at a time into an
// L1-sized fp32 buffer, then rounded (4-bit with groups of 16k weights: dequant4_rows_bf16).
template <int BITS>
void dequant_rows_bf16(const Layer& L, int64_t n0, int64_t n1, uint16_t* out, int64_t k8) {
#if defined(__AVX512BF16__)
  if (BITS == 4 && L.gp % 2 == 0 && L.np % 8 == 0) return dequant4_rows_bf16(L, n0, n1, out, k8);
#endif
  constexpr int64_t kRows = 16;
  float* f = thread_scratch<float, 1>(kRows * k8);  // tag 1: not the fp32 GEMM's tiles
  for (int64_t r = n0; r < n1; r += kRows) {
    const int64_t nr = std::min(kRows, n1 - r);
    dequant_rows<BITS>(L, r, r + nr, f, k8);
    to_bf16(f, out + (r - n0) * k8, nr * k8);
  }
}

at::Tensor bf16_view(uint16_t* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kBFloat16));
}

// The bf16 rate is reached only with enough rows per call: below this many, the gemv (W read once
// per 4 rows of x, x kept in fp32) is faster than a bf16 matmul call.
constexpr int64_t kBf16GemmMinM = 16;

}  // namespace

at::Tensor to_bf16_tensor(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "to_bf16 needs a contiguous float32 tensor");
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* src = x.data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t a, int64_t b) { to_bf16(src + a, dst + a, b - a); });
  return out;
}

template <int BITS>
void gemm_tiled_bf16(const Layer& L, const at::Tensor& x, at::Tensor& y) {
  const int64_t k8 = 8 * L.np;
  if (amx_rows(x.size(0)) && k8 % 32 == 0 && amx_bf16_active()) {
    // AMX tiles straight from each thread's dequantized 32-row blocks (amx.h): no bf16 copy of W
    // handed to oneDNN and reordered there
    BfRows rows{nullptr, k8, [&](int64_t n0, int64_t n1, uint16_t* dst) { dequant_rows_bf16<BITS>(L, n0, n1, dst, k8); }};
    amx_bf16_gemm(x.data_ptr<float>(), x.size(0), x.stride(0), k8, rows, L.n, y.data_ptr<float>(), L.n);
    if (L.bias) y.add_(at::from_blob((void*)L.bias, {L.n}, x.options()));
    return;
  }
  const at::Tensor xb = to_bf16_tensor(x.contiguous());
  // y[:, n0 : n0 + nr] = xb @ tile^T (bf16 product, fp32 accumulation inside oneDNN; the bf16
  // result is widened into y, which stays fp32)
  auto multiply = [&](uint16_t* t, int64_t n0, int64_t nr) {
    y.narrow(1, n0, nr).copy_(at::mm(xb, bf16_view(t, nr, k8).t()));
  };
  if (x.size(0) >= 256) {
    // compute-bound: one large multi-threaded matmul per 4 MiB bf16 tile of W
    const int64_t rows = std::clamp<int64_t>((4 << 20) / 2 / k8, 64, L.n);
    shared_tiles(L.n, rows, k8, thread_scratch<uint16_t>(rows * k8),
                 [&](int64_t r0, int64_t r1, uint16_t* out) { dequant_rows_bf16<BITS>(L, r0, r1, out, k8); },
                 multiply);
  } else {
    // each thread dequantizes its own L2-sized tiles and multiplies them at once (single-threaded,
    // nested), so the weights never travel to memory and back; equal 32-row-aligned tiles
    const int64_t max_rows = std::clamp<int64_t>((512 << 10) / 2 / k8 / 32 * 32, 32, L.n);
    parallel_tiles(L.n, equal_tile_rows(L.n, max_rows, 32), [&](int64_t n0, int64_t nr) {
      uint16_t* t = thread_scratch<uint16_t>(nr * k8);
      dequant_rows_bf16<BITS>(L, n0, n0 + nr, t, k8);
      multiply(t, n0, nr);
    });
  }
  if (L.bias) y.add_(at::from_blob((void*)L.bias, {L.n}, x.options()));
}

template void gemm_tiled_bf16<4>(const Layer&, const at::Tensor&, at::Tensor&);
template void gemm_tiled_bf16<8>(const Layer&, const at::Tensor&, at::Tensor&);

namespace {

// y[m, n] = sum_k x[m, k] * w[n, k] for MM rows of x and one bf16 row of W: each 8 (AVX2) or 16
// (AVX-512) weights are widened once (bf16 -> fp32 is exact: the bits shifted up by 16) and
// multiplied into MM accumulators.
template <int MM>
inline void dot_rows(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy) {
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 acc[MM];
  for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m512i wi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(wi, 16));
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k), wf, acc[m]);
  }
  float tot[MM];
  for (int m = 0; m < MM; ++m) tot[m] = _mm512_reduce_add_ps(acc[m]);
#else
  __m256 acc[MM];
  for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 wf = load8_bf16(w + k);
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wf, acc[m]);
  }
  float tot[MM];
  for (int m = 0; m < MM; ++m) tot[m] = hsum(acc[m]);
#endif
  for (; k < K; ++k) {
    const uint32_t u = static_cast<uint32_t>(w[k]) << 16;
    float wf;
    std::memcpy(&wf, &u, 4);
    for (int m = 0; m < MM; ++m) tot[m] += x[m * ldx + k] * wf;
  }
  for (int m = 0; m < MM; ++m) y[m * ldy] = tot[m];
}

void gemv_bf16(const float* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N, int64_t K, float* y) {
  constexpr int MB = 4;  // rows of x per pass over W
  // ~32k weights per task, as the quantized gemv
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m0);
      const float* xm = x + m0 * ldx;
      float* ym = y + m0 * N;
      with_rows<MB>(mb, [&](auto r) {
        for (int64_t n = n0; n < n1; ++n) dot_rows<decltype(r)::value>(xm, ldx, w + n * K, K, ym + n, N);
      });
    }
  });
}

}  // namespace

at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
              "bf16_linear: weight must be a contiguous bfloat16 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "bf16_linear: expected input with ", K, " features, got ",
              x_in.sizes());
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bf16_linear: bias must be a contiguous float32 [N] tensor");
    b = bias->data_ptr<float>();
  }
  at::Tensor x = x_in.reshape({-1, K});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  x = x.contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y;
  if (amx_rows(M) && K % 32 == 0 && amx_bf16_active()) {
    y = at::empty({M, N}, x.options());
    amx_bf16_gemm(x.data_ptr<float>(), M, K, K, BfRows{reinterpret_cast<const uint16_t*>(w.data_ptr()), K, {}}, N,
                  y.data_ptr<float>(), N);
  } else if (M >= kBf16GemmMinM) {
    y = at::mm(to_bf16_tensor(x), w.t()).to(at::kFloat);
  } else {
    y = at::empty({M, N}, x.options());
    if (M > 0)
      gemv_bf16(x.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, K,
                y.data_ptr<float>());
  }
  if (b) y.add_(at::from_blob(const_cast<float*>(b), {N}, x.options()));
  y = y.view(out_shape);
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace lowbit::LOWBIT_ISA
