// Entry points of the quantized linear: argument checks, the Layer view of a packed weight, and
// the kernel choice by M (see layer.h for the layouts and the kernels).
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../api.h"

namespace lowbit::LOWBIT_ISA {

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
// 3 tiled sgemm, 4 gemv with fp32 x throughout, 5 tiled bf16 GEMM (bf16.cpp; mode 0 picks it from
// bf16_min_m rows on when that is > 0).
at::Tensor run_linear(const Layer& L, const at::Tensor& x_in, int64_t bits, int64_t in_features,
                      int64_t k8, int64_t tile_min_m, int64_t mode, int64_t bf16_min_m) {
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
    if (mode == 0 && bf16_min_m > 0 && M >= bf16_min_m) mode = 5;
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
    } else if (mode == 5) {
      if (bits == 4) gemm_tiled_bf16<4>(L, x, y);
      else gemm_tiled_bf16<8>(L, x, y);
    } else {
      if (bits == 4) gemm_tiled<4>(L, x, y);
      else gemm_tiled<8>(L, x, y);
    }
  }
  y = y.view(out_shape);
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

Handle::Handle(at::Tensor w_, at::Tensor scales_, at::Tensor offset_, c10::optional<at::Tensor> bias_,
               int64_t bits_, int64_t in_features_, int64_t k8_, int64_t group, int64_t tile_min_m_)
    : w(std::move(w_)), scales(std::move(scales_)), offset(std::move(offset_)),
      bias(bias_.has_value() ? *bias_ : at::Tensor()), bits(bits_), in_features(in_features_),
      k8(k8_), tile_min_m(tile_min_m_) {
  L = make_layer(w, scales, offset, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                 bits, k8, group);
}

at::Tensor Handle::forward(const at::Tensor& x) const {
  return run_linear(L, x, bits, in_features, k8, tile_min_m, 0, bf16_min_m);
}

at::Tensor Handle::forward_mode(const at::Tensor& x, int64_t mode) const {
  return run_linear(L, x, bits, in_features, k8, tile_min_m, mode);
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offset,
                   const c10::optional<at::Tensor>& bias, int64_t bits, int64_t in_features, int64_t k8,
                   int64_t group, int64_t tile_min_m, int64_t mode) {
  return run_linear(make_layer(w, scales, offset, bias, bits, k8, group), x, bits, in_features, k8, tile_min_m, mode);
}

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

}  // namespace lowbit::LOWBIT_ISA
