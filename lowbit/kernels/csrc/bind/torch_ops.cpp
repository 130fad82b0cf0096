// The ops of this variant in the torch dispatcher, namespace lowbit_<variant> (torch.ops.lowbit_avx2.*),
// with schemas that declare what each op mutates, so they compose with torch and torch.compile (the
// fake implementations that torch.compile traces with are in lowbit/kernels/fake.py).
//
// The quantized linear is a functional op here (qlinear: the layer's tensors as arguments); the
// decode hot path keeps the bound QLinear handle of bind/python.cpp instead (see registry.py for the
// measured per-call cost of each route).
#include <torch/library.h>

#include "../api.h"

// TORCH_LIBRARY pastes its namespace argument, so the variant's macro is expanded one level up.
#define LOWBIT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LOWBIT_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace ops = lowbit::LOWBIT_ISA;

LOWBIT_LIBRARY(LOWBIT_TORCH_NS, m) {
  m.def("qlinear(Tensor x, Tensor packed, Tensor scales, Tensor offset, Tensor? bias, int bits, int in_features, "
        "int k8, int group, int tile_min_m, int mode) -> Tensor");
  m.def("dequantize(Tensor packed, Tensor scales, Tensor offset, int bits, int k8, int group) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_linear(Tensor x, Tensor packed, Tensor w_scale, Tensor rowsum, Tensor? bias, int out_features) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor packed, Tensor scales, Tensor zero_scales, Tensor? bias, int out_features, "
        "int group) -> Tensor");
  m.def("int8_mac_peak(int iters) -> int");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor(a!) residual, Tensor w, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin) -> ()");
  m.def("rotary_and_cache(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor cos_sin, Tensor slots, "
        "Tensor(c!) k_pool, Tensor(d!) v_pool) -> ()");
  m.def("rotary_qkv_(Tensor(a!) qkv, int Hq, int Hkv, Tensor positions, Tensor cos_sin) -> ()");
  m.def("rotary_and_cache_qkv(Tensor(a!) qkv, int Hq, int Hkv, Tensor positions, Tensor cos_sin, Tensor slots, "
        "Tensor(b!) k_pool, Tensor(c!) v_pool) -> ()");
  m.def("quantize_to_pool(Tensor x, Tensor slots, Tensor(a!) pool, Tensor(b!) scale_zero, int bits) -> ()");
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor? k_sz, Tensor? v_sz, "
        "Tensor block_tables, Tensor context_lens, float scale, int window, int kv_dtype) -> Tensor");
  m.def("paged_decode_attention_qkv(Tensor qkv, int Hq, int Hkv, int B, Tensor k_pool, Tensor v_pool, Tensor? k_sz, "
        "Tensor? v_sz, Tensor block_tables, Tensor context_lens, float scale, int window, int kv_dtype) -> Tensor");
}

LOWBIT_LIBRARY_IMPL(LOWBIT_TORCH_NS, CPU, m) {
  m.impl("qlinear", &ops::qlinear);
  m.impl("dequantize", &ops::dequantize);
  m.impl("bf16_linear", &ops::bf16_linear);
  m.impl("quantize_per_token", &ops::quantize_per_token);
  m.impl("w8a8_linear", &ops::w8a8_linear);
  m.impl("w4a8_linear", &ops::w4a8_linear);
  m.impl("int8_mac_peak", &ops::int8_mac_peak);
  m.impl("rms_norm", &ops::rms_norm);
  m.impl("fused_add_rms_norm", &ops::fused_add_rms_norm);
  m.impl("silu_and_mul", &ops::silu_and_mul);
  m.impl("rotary_", &ops::rotary_);
  m.impl("rotary_and_cache", &ops::rotary_and_cache);
  m.impl("rotary_qkv_", &ops::rotary_qkv_);
  m.impl("rotary_and_cache_qkv", &ops::rotary_and_cache_qkv);
  m.impl("quantize_to_pool", &ops::quantize_to_pool);
  m.impl("paged_decode_attention", &ops::paged_decode_attention);
  m.impl("paged_decode_attention_qkv", &ops::paged_decode_attention_qkv);
}
