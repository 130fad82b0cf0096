// Paged decode attention entry points: argument checks, the PagedArgs view, and the task split
// (a task per sequence, or per (sequence, kv head) for a single sequence).
#include <ATen/ops/empty.h>

#include "../api.h"
#include "../ops/views.h"
#include "paged.h"

namespace lowbit::LOWBIT_ISA {

// q [B, Hq, D]; pools [blocks, block_size, Hkv, D or D/2] (fp32, bf16 or uint8 codes, with k_sz/v_sz
// [blocks, block_size, Hkv, 2] for the quantized ones); block_tables int32 [B, max_blocks];
// context_lens int32 [B]. kv_dtype: 0 fp32, 1 int8, 2 int4, 3 bf16. window > 0 keeps the last
// `window` keys.
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
  TORCH_CHECK(kv_dtype >= 0 && kv_dtype <= 3, "kv_dtype must be 0 (fp32), 1 (int8), 2 (int4) or 3 (bf16)");
  const Kv kind = static_cast<Kv>(kv_dtype);
  if (!kv_quantized(kind)) {
    const auto st = kind == Kv::F32 ? at::kFloat : at::kBFloat16;
    TORCH_CHECK(k_pool.scalar_type() == st && v_pool.scalar_type() == st && k_pool.size(3) == D,
                kind == Kv::F32 ? "fp32" : "bf16", " pools must hold [.., ", D, "] of that dtype");
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
  a.v_sz = kv_quantized(kind) ? v_sz->data_ptr<float>() : nullptr;
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
        with_kv(kind, [&](auto t) { attend_seq_dispatch<decltype(t)::value>(a, b, buf); });
      }
    });
    return out;
  }
  const int64_t tasks = B * Hkv;  // one sequence (or very wide groups): split the heads instead
  at::parallel_for(0, tasks, grain_for(avg * 2 * G * D), [&](int64_t i0, int64_t i1) {
    std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      with_kv(kind, [&](auto t) { attend_one<decltype(t)::value>(a, b, h, buf); });
    }
  });
  return out;
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

}  // namespace lowbit::LOWBIT_ISA
