// Fused CPU ops for the decode hot path (AVX2 + FMA, fp32 activations).
//
// Why: at batch-1 decode a small model spends more time dispatching tiny tensor ops than
// streaming weights. RMSNorm alone is ~6 aten ops, rotary ~10, paged attention a gather copy plus
// SDPA; each costs microseconds of dispatcher + Python time while the arithmetic is nanoseconds.
// Every op here does one of those chains in one call, reading its inputs once.
//
// Conventions: tensors are fp32 unless noted; "rows" may be strided (stride(-1) must be 1), so
// views into a fused qkv / gate_up output are read in place. Work is split with at::parallel_for
// (torch's own OpenMP pool, so there is one pool, not two) only when it is large enough to pay for
// waking the second thread; tiny decode-step work runs on the calling thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kParallelWork = 1 << 15;  // ~32K multiply-adds: below this, stay on one thread

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float hmax(__m256 v) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x) for 8 floats: range reduction x = n ln2 + r (ln2 split in two for exactness), a degree-5
// minimax polynomial for e^r on |r| <= ln2/2 (the classic Cephes coefficients), then 2^n through
// the exponent bits. Relative error ~1e-7, i.e. fp32 rounding level; inputs clamped to the finite
// range (softmax feeds x <= 0, SiLU any value).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, exp8(_mm256_set1_ps(x)));
  return buf[0];
}

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

// ------------------------------------------------------------------------------- rotary + KV write
// Non-interleaved ("rotate half") rotary: for i < D/2, (x_i, x_{i+D/2}) is rotated by the angle of
// frequency i. cos_sin[p] = [cos(p f_0..f_{D/2-1}) | sin(...)], the table RotaryEmbedding builds.
struct Heads {
  float* p;
  int64_t s_tok, s_head, n_heads;
};

Heads heads_of(const at::Tensor& t, int64_t D, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 3 && t.size(2) == D && t.stride(2) == 1, name, " must be [N, H, ", D,
              "] with unit last stride, got ", t.sizes(), " strides ", t.strides());
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.size(1)};
}

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

// Rotates q and k in place; when k_pool/v_pool are given ([rows, Hkv, D] fp32 views of the
// paged pool, row = slot), also stores the rotated k and v at slots[n].
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
  float *kp = nullptr, *vp = nullptr;
  int64_t rows = 0;
  const int64_t H = hk.n_heads;
  if (slots != nullptr) {
    hv = heads_of(*v, D, "v");
    TORCH_CHECK(v->size(0) == N && v->size(1) == H, "v must match k's shape");
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == N,
                "slots must be a contiguous int64 [N] tensor");
    for (at::Tensor* pool : {k_pool, v_pool})
      TORCH_CHECK(pool->scalar_type() == at::kFloat && pool->is_contiguous() && pool->numel() % (H * D) == 0,
                  "KV pool must be contiguous fp32 with ", H, " heads of ", D);
    TORCH_CHECK(k_pool->numel() == v_pool->numel(), "K and V pools differ in size");
    slot = slots->data_ptr<int64_t>();
    kp = k_pool->data_ptr<float>();
    vp = v_pool->data_ptr<float>();
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
          std::copy(kr, kr + D, kp + (slot[n] * H + h) * D);
          const float* vr = hv.p + n * hv.s_tok + h * hv.s_head;
          std::copy(vr, vr + D, vp + (slot[n] * H + h) * D);
        }
      }
    }
  });
}

void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin) {
  rotary_impl(q, k, positions, cos_sin, nullptr, nullptr, nullptr, nullptr);
}

void rotary_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& cos_sin, const at::Tensor& slots, at::Tensor k_pool, at::Tensor v_pool) {
  rotary_impl(q, k, positions, cos_sin, &v, &slots, &k_pool, &v_pool);
}

// ------------------------------------------------------------------------------- quantized KV write
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

// ------------------------------------------------------------------------------- paged decode attention
// One query token per sequence against its cached keys/values, read block by block in place:
// scores for the G query heads that share a kv head (GQA: each K/V row is read once for all G),
// an exact softmax, then the weighted sum of V. Scores are kept (G x context floats, a few KiB)
// rather than rescaled online: one pass over K, one over V, one exp per score, no per-block
// rescale of the accumulators. Tasks: one per sequence when there are several (attend_seq: rows
// read front to back across the kv heads), one per (sequence, kv head) for a single sequence
// (attend_one: its heads can still run in parallel).
//
// Pool element types (kv_cache.py's schemes), dequantized as code * scale + zero inside the math,
// never into a copy:
//   int8: K and V per token and head, fp32 (scale, zero) [blocks, bs, Hkv, 2]:
//         q . k = scale * (q . codes) + zero * sum(q);
//   int4: V as int8 but 4-bit; K per channel over each block's tokens, fp16 (scale, zero)
//         [blocks, 2, Hkv, D]: q . k = (q * scale_blk) . codes + q . zero_blk, the two q-side
//         factors computed once per block;
//   both: sum_t p_t v_t = sum_t (p_t scale_t) codes_t + sum_t p_t zero_t.
enum class Kv { F32, U8, U4 };

template <Kv T>
struct KvRow;

template <>
struct KvRow<Kv::F32> {
  static inline __m256 load(const void* base, int64_t i, int64_t /*half*/) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }
};

template <>
struct KvRow<Kv::U8> {
  static inline __m256 load(const void* base, int64_t i, int64_t /*half*/) {
    const uint8_t* p = static_cast<const uint8_t*>(base) + i;
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// int4: byte j holds element j (low nibble) and element j + D/2 (high nibble).
template <>
struct KvRow<Kv::U4> {
  static inline __m256 load(const void* base, int64_t i, int64_t half) {
    const uint8_t* p = static_cast<const uint8_t*>(base) + (i < half ? i : i - half);
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i v = i < half ? _mm256_and_si256(b, _mm256_set1_epi32(15)) : _mm256_srli_epi32(b, 4);
    return _mm256_cvtepi32_ps(v);
  }
};

struct PagedArgs {
  const float* q;
  int64_t q_s_tok, q_s_head;
  const uint8_t* k;  // pool base, bytes
  const uint8_t* v;
  const float* k_sz;  // int8: [rows, Hkv, 2] (scale, zero) or nullptr
  const uint16_t* k_ch;  // int4: fp16 [blocks, 2, Hkv, D] per-channel (scale, zero) of each block
  const float* v_sz;
  int64_t row_bytes;  // bytes of one (token, head) row
  const int32_t* tables;
  int64_t max_blocks;
  const int32_t* lens;
  int64_t bs, Hkv, G, D;
  int64_t window;
  float scale;
  float* out;  // [B, Hq, D] contiguous
};

// Softmax over each of `rows` score rows of length n, in place (unnormalised: inv[r] = 1 / sum).
inline void softmax_rows(float* sc, int64_t rows, int64_t n, float* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = sc + r * n;
    __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
    float m = hmax(mv);
    for (; i < n; ++i) m = std::max(m, s[i]);
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mb));
      _mm256_storeu_ps(s + i, e);
      sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (; i < n; ++i) {
      s[i] = exp1(s[i] - m);
      sum += s[i];
    }
    inv[r] = 1.0f / sum;
  }
}

// Requests `bytes` from p into L2 (one prefetch per cache line).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

// The pool rows of the block holding token t of a sequence, from t to the block's end or len:
// {first pool row, count}. Both passes walk a sequence block by block with it.
struct BlockSpan {
  int64_t row0, cnt;
};
inline BlockSpan block_span(const PagedArgs& a, const int32_t* table, int64_t t, int64_t len) {
  const int64_t off = t % a.bs;
  return {static_cast<int64_t>(table[t / a.bs]) * a.bs + off, std::min(a.bs - off, len - t)};
}

// A sequence's V is prefetched during pass 1 only if it all fits this budget, a fraction of the
// 1-2 MiB L2 of current cores (a longer context would evict it before pass 2 reads it).
constexpr int64_t kPrefetchVBytes = 512 * 1024;

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
        const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + i)));
        const __m256 zv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + i)));
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
        if constexpr (T == Kv::F32) {
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

// Horizontal sums of four vectors at once: {sum a0, sum a1, sum a2, sum a3}.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

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
      if constexpr (T != Kv::F32) vs = a.v_sz[row * 2];
#pragma GCC unroll 8
      for (int g = 0; g < GN; ++g) {
        const float p = p0[g * n + idx];
        const __m256 w = _mm256_set1_ps(p * vs);
#pragma GCC unroll 4
        for (int s = 0; s < NV; ++s) acc[g][s] = _mm256_fmadd_ps(w, vv[s], acc[g][s]);
        if constexpr (T != Kv::F32) z[g] += p * a.v_sz[row * 2 + 1];
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
            _mm256_storeu_ps(qs + j * D + i,
                             _mm256_mul_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + i)))));
            za = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + i))), za);
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

// q [B, Hq, D]; pools [blocks, block_size, Hkv, D or D/2] (fp32 or uint8 codes, with k_sz/v_sz
// [blocks, block_size, Hkv, 2] for the quantized ones); block_tables int32 [B, max_blocks];
// context_lens int32 [B]. kv_dtype: 0 fp32, 1 int8, 2 int4. window > 0 keeps the last `window` keys.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const c10::optional<at::Tensor>& k_sz, const c10::optional<at::Tensor>& v_sz,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, int64_t kv_dtype) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1, "q must be fp32 [B, Hq, D]");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() && v_pool.is_contiguous(),
              "K/V pools must be contiguous [blocks, block_size, Hkv, d] tensors of one shape");
  const int64_t bs = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of kv heads (", Hkv, ")");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8, got ", D);
  TORCH_CHECK(kv_dtype >= 0 && kv_dtype <= 2, "kv_dtype must be 0 (fp32), 1 (int8) or 2 (int4)");
  const Kv kind = static_cast<Kv>(kv_dtype);
  if (kind == Kv::F32) {
    TORCH_CHECK(k_pool.scalar_type() == at::kFloat && k_pool.size(3) == D, "fp32 pool must hold [.., ", D, "]");
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kByte && v_pool.scalar_type() == at::kByte, "quantized pools are uint8");
    TORCH_CHECK(k_pool.size(3) == (kind == Kv::U8 ? D : D / 2), "quantized pool has the wrong row width");
    TORCH_CHECK(kind != Kv::U4 || D % 16 == 0, "int4 pools need head_dim % 16 == 0");
    TORCH_CHECK(k_sz.has_value() && v_sz.has_value(), "quantized pools need k_sz and v_sz");
    const int64_t per_token = k_pool.size(0) * bs * Hkv * 2;
    TORCH_CHECK(v_sz->scalar_type() == at::kFloat && v_sz->is_contiguous() && v_sz->numel() == per_token,
                "v_sz must be contiguous fp32 [blocks, block_size, Hkv, 2]");
    if (kind == Kv::U8) {
      TORCH_CHECK(k_sz->scalar_type() == at::kFloat && k_sz->is_contiguous() && k_sz->numel() == per_token,
                  "int8 k_sz must be contiguous fp32 [blocks, block_size, Hkv, 2]");
    } else {
      TORCH_CHECK(k_sz->scalar_type() == at::kHalf && k_sz->is_contiguous() && k_sz->dim() == 4 &&
                      k_sz->size(0) == k_pool.size(0) && k_sz->size(1) == 2 && k_sz->size(2) == Hkv &&
                      k_sz->size(3) == D, "int4 k_sz must be contiguous fp16 [blocks, 2, Hkv, D]");
    }
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.is_contiguous(), "block_tables must be contiguous int32 [B, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.numel() == B && context_lens.is_contiguous(),
              "context_lens must be contiguous int32 [B]");
  const int64_t max_blocks = block_tables.size(1), num_blocks = k_pool.size(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= max_blocks * bs, "context length ", lens[b], " exceeds the block table");
    const int64_t used = (lens[b] + bs - 1) / bs;
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK(tables[b * max_blocks + j] >= 0 && tables[b * max_blocks + j] < num_blocks, "block id ",
                  tables[b * max_blocks + j], " outside the pool");
    total += lens[b];
  }
  auto out = at::empty({B, Hq, D}, q.options());
  PagedArgs a{};
  a.q = q.data_ptr<float>();
  a.q_s_tok = q.stride(0);
  a.q_s_head = q.stride(1);
  a.k = static_cast<const uint8_t*>(k_pool.data_ptr());
  a.v = static_cast<const uint8_t*>(v_pool.data_ptr());
  a.k_sz = kind == Kv::U8 ? k_sz->data_ptr<float>() : nullptr;
  a.k_ch = kind == Kv::U4 ? reinterpret_cast<const uint16_t*>(k_sz->data_ptr<at::Half>()) : nullptr;
  a.v_sz = kind == Kv::F32 ? nullptr : v_sz->data_ptr<float>();
  a.row_bytes = k_pool.size(3) * k_pool.element_size();
  a.tables = tables;
  a.max_blocks = max_blocks;
  a.lens = lens;
  a.bs = bs;
  a.Hkv = Hkv;
  a.G = G;
  a.D = D;
  a.window = window;
  a.scale = static_cast<float>(scale);
  a.out = out.data_ptr<float>();
  const int64_t avg = std::max<int64_t>(1, total / std::max<int64_t>(1, B));
  if (B > 1 && G <= 8) {  // many sequences: one task per sequence, blocks read front to back
    at::parallel_for(0, B, grain_for(avg * 2 * Hq * D), [&](int64_t b0, int64_t b1) {
      std::vector<float> buf;
      for (int64_t b = b0; b < b1; ++b) {
        if (kind == Kv::F32) attend_seq_dispatch<Kv::F32>(a, b, buf);
        else if (kind == Kv::U8) attend_seq_dispatch<Kv::U8>(a, b, buf);
        else attend_seq_dispatch<Kv::U4>(a, b, buf);
      }
    });
    return out;
  }
  const int64_t tasks = B * Hkv;  // one sequence (or very wide groups): split the heads instead
  at::parallel_for(0, tasks, grain_for(avg * 2 * G * D), [&](int64_t i0, int64_t i1) {
    std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      if (kind == Kv::F32) attend_one<Kv::F32>(a, b, h, buf);
      else if (kind == Kv::U8) attend_one<Kv::U8>(a, b, h, buf);
      else attend_one<Kv::U4>(a, b, h, buf);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------- fused-projection entry points
// The decoder's fused qkv projection is one [N, (Hq + 2 Hkv) D] tensor. These take it whole and
// slice q/k/v here, saving the engine's decode loop the Python-side split + views per layer.
struct Qkv {
  at::Tensor q, k, v;
};

Qkv split_qkv(const at::Tensor& qkv, int64_t Hq, int64_t Hkv) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [N, (Hq + 2 Hkv) * D] with unit last stride");
  TORCH_CHECK(Hq > 0 && Hkv > 0 && qkv.size(1) % (Hq + 2 * Hkv) == 0, "qkv width ", qkv.size(1),
              " is not (Hq + 2 Hkv) * D for Hq=", Hq, ", Hkv=", Hkv);
  const int64_t N = qkv.size(0), D = qkv.size(1) / (Hq + 2 * Hkv), S = qkv.stride(0);
  const int64_t o = qkv.storage_offset();
  return {qkv.as_strided({N, Hq, D}, {S, D, 1}, o), qkv.as_strided({N, Hkv, D}, {S, D, 1}, o + Hq * D),
          qkv.as_strided({N, Hkv, D}, {S, D, 1}, o + (Hq + Hkv) * D)};
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

// Attention for the first B rows of qkv (the decode batch); returns [B, Hq * D], o_proj's input.
at::Tensor paged_decode_attention_qkv(const at::Tensor& qkv, int64_t Hq, int64_t Hkv, int64_t B,
                                      const at::Tensor& k_pool, const at::Tensor& v_pool,
                                      const c10::optional<at::Tensor>& k_sz, const c10::optional<at::Tensor>& v_sz,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      int64_t window, int64_t kv_dtype) {
  TORCH_CHECK(B >= 0 && B <= qkv.size(0), "decode batch ", B, " exceeds the ", qkv.size(0), " rows of qkv");
  Qkv t = split_qkv(qkv, Hq, Hkv);
  at::Tensor out = paged_decode_attention(t.q.narrow(0, 0, B), k_pool, v_pool, k_sz, v_sz, block_tables,
                                          context_lens, scale, window, kv_dtype);
  return out.view({B, -1});
}

}  // namespace

// Kernels run without the GIL (they touch tensors only): the server's event loop thread keeps
// streaming while the engine thread is inside a kernel.
#define kNoGil pybind11::call_guard<pybind11::gil_scoped_release>()

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, kNoGil, "w * x / rms(x) over rows of a [M, n] fp32 tensor");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, kNoGil, "residual += x (in place); return rms_norm(residual)");
  m.def("silu_and_mul", &silu_and_mul, kNoGil, "[M, 2I] -> silu(x[:, :I]) * x[:, I:]");
  m.def("rotary_", &rotary_, kNoGil, "rotary on q [N, Hq, D] and k [N, Hkv, D] in place");
  m.def("rotary_and_cache", &rotary_and_cache, kNoGil, "rotary on q, k in place; store k, v at slots of fp32 pools");
  m.def("quantize_to_pool", &quantize_to_pool, kNoGil,
        "per-token, per-head asymmetric int8/int4 codes of x [N, H, D] stored at slots of a uint8 pool");
  m.def("paged_decode_attention", &paged_decode_attention, kNoGil, "one-token attention over paged K/V blocks");
  m.def("rotary_qkv_", &rotary_qkv_, kNoGil, "rotary_ on the q and k parts of a fused [N, (Hq + 2 Hkv) D] qkv");
  m.def("rotary_and_cache_qkv", &rotary_and_cache_qkv, kNoGil, "rotary_and_cache on a fused qkv");
  m.def("paged_decode_attention_qkv", &paged_decode_attention_qkv, kNoGil,
        "paged_decode_attention for the first B rows of a fused qkv -> [B, Hq * D]");
}
