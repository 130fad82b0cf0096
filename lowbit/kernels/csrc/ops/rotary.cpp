// Rotary embedding in place, optionally with the store of the rotated k and v into an fp32 or bf16
// pool (bf16: rounded to nearest even, as torch rounds).
#include "../api.h"
#include "../common/vec.h"
#include "views.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// Non-interleaved ("rotate half") rotary: for i < D/2, (x_i, x_{i+D/2}) is rotated by the angle of
// frequency i. cos_sin[p] = [cos(p f_0..f_{D/2-1}) | sin(...)], the table RotaryEmbedding builds.
inline void rotate(float* x, const float* cs, int64_t half) {
  const float* c = cs;
  const float* s = cs + half;
  float* x2 = x + half;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x2 + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(x + i, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
    _mm256_storeu_ps(x2 + i, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x2[i];
    x[i] = a * c[i] - b * s[i];
    x2[i] = b * c[i] + a * s[i];
  }
}

// One head's row of D values into a pool at element offset `at`.
inline void store_row(const float* src, void* pool, bool bf16, int64_t at, int64_t D) {
  if (bf16) to_bf16(src, static_cast<uint16_t*>(pool) + at, D);
  else std::copy(src, src + D, static_cast<float*>(pool) + at);
}

// Rotates q and k in place; when k_pool/v_pool are given ([rows, Hkv, D] fp32 or bf16 views of
// the paged pool, row = slot), also stores the rotated k and v at slots[n].
void rotary_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin,
                 const at::Tensor* v, const at::Tensor* slots, at::Tensor* k_pool, at::Tensor* v_pool) {
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.is_contiguous(), "bad cos_sin");
  const int64_t D = cos_sin.size(1), half = D / 2, P = cos_sin.size(0);
  TORCH_CHECK(D % 2 == 0, "rotary needs an even head_dim");
  Heads hq = heads_of(q, D, "q"), hk = heads_of(k, D, "k");
  const int64_t N = q.size(0);
  TORCH_CHECK(k.size(0) == N, "q and k token counts differ");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == N,
              "positions must be a contiguous int64 [N] tensor");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* table = cos_sin.data_ptr<float>();
  Heads hv{};
  const int64_t* slot = nullptr;
  void *kp = nullptr, *vp = nullptr;
  bool bf16 = false;
  int64_t rows = 0;
  const int64_t H = hk.n_heads;
  if (slots != nullptr) {
    hv = heads_of(*v, D, "v");
    TORCH_CHECK(v->size(0) == N && v->size(1) == H, "v must match k's shape");
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == N,
                "slots must be a contiguous int64 [N] tensor");
    bf16 = k_pool->scalar_type() == at::kBFloat16;
    for (at::Tensor* pool : {k_pool, v_pool})
      TORCH_CHECK((pool->scalar_type() == at::kFloat || pool->scalar_type() == at::kBFloat16) &&
                      pool->scalar_type() == k_pool->scalar_type() && pool->is_contiguous() &&
                      pool->numel() % (H * D) == 0,
                  "KV pools must be contiguous fp32 or bf16 (both the same) with ", H, " heads of ", D);
    TORCH_CHECK(k_pool->numel() == v_pool->numel(), "K and V pools differ in size");
    slot = slots->data_ptr<int64_t>();
    kp = k_pool->data_ptr();
    vp = v_pool->data_ptr();
    rows = k_pool->numel() / (H * D);
  }
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(pos[n] >= 0 && pos[n] < P, "position ", pos[n], " outside the rotary table (", P, " rows)");
    if (slot != nullptr) TORCH_CHECK(slot[n] >= 0 && slot[n] < rows, "slot ", slot[n], " outside the KV pool");
  }
  const int64_t heads = hq.n_heads + H;
  at::parallel_for(0, N, grain_for(heads * D * 2), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* cs = table + pos[n] * D;
      for (int64_t h = 0; h < hq.n_heads; ++h) rotate(hq.p + n * hq.s_tok + h * hq.s_head, cs, half);
      for (int64_t h = 0; h < H; ++h) {
        float* kr = hk.p + n * hk.s_tok + h * hk.s_head;
        rotate(kr, cs, half);
        if (slot != nullptr) {
          store_row(kr, kp, bf16, (slot[n] * H + h) * D, D);
          store_row(hv.p + n * hv.s_tok + h * hv.s_head, vp, bf16, (slot[n] * H + h) * D, D);
        }
      }
    }
  });
}

}  // namespace

void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin) {
  rotary_impl(q, k, positions, cos_sin, nullptr, nullptr, nullptr, nullptr);
}

void rotary_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& cos_sin, const at::Tensor& slots, at::Tensor k_pool, at::Tensor v_pool) {
  rotary_impl(q, k, positions, cos_sin, &v, &slots, &k_pool, &v_pool);
}

void rotary_qkv_(const at::Tensor& qkv, int64_t Hq, int64_t Hkv, const at::Tensor& positions,
                 const at::Tensor& cos_sin) {
  Qkv t = split_qkv(qkv, Hq, Hkv);
  rotary_impl(t.q, t.k, positions, cos_sin, nullptr, nullptr, nullptr, nullptr);
}

void rotary_and_cache_qkv(const at::Tensor& qkv, int64_t Hq, int64_t Hkv, const at::Tensor& positions,
                          const at::Tensor& cos_sin, const at::Tensor& slots, at::Tensor k_pool, at::Tensor v_pool) {
  Qkv t = split_qkv(qkv, Hq, Hkv);
  rotary_impl(t.q, t.k, positions, cos_sin, &t.v, &slots, &k_pool, &v_pool);
}

}  // namespace lowbit::LOWBIT_ISA
