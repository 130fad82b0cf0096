// Quantized KV write: per-token, per-head asymmetric int8/int4 codes stored at pool slots.
#include <cmath>
#include <vector>

#include "../api.h"
#include "views.h"

namespace lowbit::LOWBIT_ISA {

// kv_cache.py's per-token, per-head asymmetric scheme in one pass per row (the torch version is
// ~10 small ops plus 4 index copies, ~0.25 ms per layer of a 64-sequence decode step):
// scale = max((max - min) / qmax, 1e-8), zero = min, code = clamp(round((x - zero) / scale)).
// The same float operations in the same order (true division, round half to even), so the codes
// are bit-identical to kv_cache.quantize. int4 packs element j (low nibble) with j + D/2 (high).
void quantize_to_pool(const at::Tensor& x, const at::Tensor& slots, at::Tensor pool, at::Tensor scale_zero,
                      int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "quantize_to_pool: bits must be 8 or 4");
  TORCH_CHECK(x.dim() == 3, "x must be [N, H, D]");
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2);
  Heads hx = heads_of(x, D, "x");
  const int64_t Dc = bits == 8 ? D : D / 2;
  TORCH_CHECK(bits == 8 || D % 2 == 0, "int4 needs an even head_dim");
  TORCH_CHECK(pool.scalar_type() == at::kByte && pool.is_contiguous() && pool.numel() % (H * Dc) == 0,
              "pool must be contiguous uint8 with ", H, " heads of ", Dc, " bytes");
  const int64_t rows = pool.numel() / (H * Dc);
  TORCH_CHECK(scale_zero.scalar_type() == at::kFloat && scale_zero.is_contiguous() && scale_zero.numel() == rows * H * 2,
              "scale_zero must be contiguous float32 [rows, H, 2] matching the pool");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == N,
              "slots must be a contiguous int64 [N] tensor");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(slot[n] >= 0 && slot[n] < rows, "slot ", slot[n], " outside the KV pool");
  uint8_t* qp = pool.data_ptr<uint8_t>();
  float* szp = scale_zero.data_ptr<float>();
  const float qmax = bits == 8 ? 255.f : 15.f;
  at::parallel_for(0, N, grain_for(H * D * 4), [&](int64_t n0, int64_t n1) {
    std::vector<float> codes(D);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t h = 0; h < H; ++h) {
        const float* r = hx.p + n * hx.s_tok + h * hx.s_head;
        float mn = r[0], mx = r[0];
        for (int64_t i = 1; i < D; ++i) {
          mn = std::min(mn, r[i]);
          mx = std::max(mx, r[i]);
        }
        float scale = (mx - mn) / qmax;
        scale = scale < 1e-8f ? 1e-8f : scale;
        int64_t i = 0;
        const __m256 vmn = _mm256_set1_ps(mn), vs = _mm256_set1_ps(scale), vq = _mm256_set1_ps(qmax);
        for (; i + 8 <= D; i += 8) {  // max(c, 0) first: NaN -> 0 as below
          __m256 c = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(r + i), vmn), vs);
          c = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          _mm256_storeu_ps(codes.data() + i, _mm256_min_ps(_mm256_max_ps(c, _mm256_setzero_ps()), vq));
        }
        for (; i < D; ++i) {
          const float c = std::nearbyint((r[i] - mn) / scale);
          codes[i] = c > 0.f ? (c > qmax ? qmax : c) : 0.f;  // NaN -> 0
        }
        uint8_t* dst = qp + (slot[n] * H + h) * Dc;
        if (bits == 8) {
          for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<uint8_t>(codes[i]);
        } else {
          for (int64_t i = 0; i < Dc; ++i)
            dst[i] = static_cast<uint8_t>(codes[i]) | static_cast<uint8_t>(static_cast<uint8_t>(codes[i + Dc]) << 4);
        }
        float* sz = szp + (slot[n] * H + h) * 2;
        sz[0] = scale;
        sz[1] = mn;
      }
    }
  });
}

}  // namespace lowbit::LOWBIT_ISA
