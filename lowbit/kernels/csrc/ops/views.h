// Fused CPU ops for the decode hot path (fp32 activations): what their translation units share.
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
//
// Files: norm_act.cpp (RMSNorm, fused add + RMSNorm, SiLU * up), rotary.cpp (rotary, with the KV
// write into an fp32 pool), kv_quant.cpp (quantized KV write); paged decode attention is in
// ../attention/.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../common/isa.h"

namespace lowbit::LOWBIT_ISA {

constexpr int64_t kParallelWork = 1 << 15;  // ~32K multiply-adds: below this, stay on one thread

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}

// A [N, H, D] fp32 tensor with unit last stride, as a base pointer and strides.
struct Heads {
  float* p;
  int64_t s_tok, s_head, n_heads;
};

inline Heads heads_of(const at::Tensor& t, int64_t D, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 3 && t.size(2) == D && t.stride(2) == 1, name, " must be [N, H, ", D,
              "] with unit last stride, got ", t.sizes(), " strides ", t.strides());
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.size(1)};
}

// The decoder's fused qkv projection is one [N, (Hq + 2 Hkv) D] tensor. The *_qkv entry points take
// it whole and slice q/k/v here, saving the engine's decode loop the Python-side split + views per layer.
struct Qkv {
  at::Tensor q, k, v;
};

inline Qkv split_qkv(const at::Tensor& qkv, int64_t Hq, int64_t Hkv) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [N, (Hq + 2 Hkv) * D] with unit last stride");
  TORCH_CHECK(Hq > 0 && Hkv > 0 && qkv.size(1) % (Hq + 2 * Hkv) == 0, "qkv width ", qkv.size(1),
              " is not (Hq + 2 Hkv) * D for Hq=", Hq, ", Hkv=", Hkv);
  const int64_t N = qkv.size(0), D = qkv.size(1) / (Hq + 2 * Hkv), S = qkv.stride(0);
  const int64_t o = qkv.storage_offset();
  return {qkv.as_strided({N, Hq, D}, {S, D, 1}, o), qkv.as_strided({N, Hkv, D}, {S, D, 1}, o + Hq * D),
          qkv.as_strided({N, Hkv, D}, {S, D, 1}, o + (Hq + Hkv) * D)};
}

}  // namespace lowbit::LOWBIT_ISA
