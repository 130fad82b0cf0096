// Every entry point of one instruction-set variant, as the bindings (bind/) see them. Each is
// defined once in its op family's directory and bound twice: to the torch dispatcher (TORCH_LIBRARY
// schemas, bind/torch_ops.cpp) and directly to Python (bind/python.cpp, the decode hot path).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "qgemm/layer.h"

namespace lowbit::LOWBIT_ISA {

// ---- quantized linear (qgemm/linear.cpp)
// y[..., N] = x[..., K] @ W^T (+ bias) for a packed weight; mode 0 picks the kernel by M
// (1 gemv, 2 blocked GEMM, 3 tiled sgemm, 4 gemv with fp32 x, 5 tiled bf16 GEMM); with bf16_min_m > 0,
// mode 0 runs mode 5 from that many rows on.
at::Tensor run_linear(const Layer& L, const at::Tensor& x_in, int64_t bits, int64_t in_features, int64_t k8,
                      int64_t tile_min_m, int64_t mode, int64_t bf16_min_m = 0);

// run_linear with the layer given as tensors (the dispatcher op; the hot path binds a Handle once).
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offset,
                   const c10::optional<at::Tensor>& bias, int64_t bits, int64_t in_features, int64_t k8,
                   int64_t group, int64_t tile_min_m, int64_t mode);

// fp32 W [N, K8] of a packed weight.
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offset, int64_t bits,
                      int64_t k8, int64_t group);

// A layer bound once: holds its tensors (keeping the raw pointers in Layer valid) so a call
// converts one Python argument instead of eleven.
struct Handle {
  at::Tensor w, scales, offset, bias;
  Layer L;
  int64_t bits, in_features, k8, tile_min_m;
  int64_t bf16_min_m = 0;  // > 0: from this many rows on the matmul runs in bf16 (EngineArgs.dtype)

  Handle(at::Tensor w_, at::Tensor scales_, at::Tensor offset_, c10::optional<at::Tensor> bias_, int64_t bits_,
         int64_t in_features_, int64_t k8_, int64_t group, int64_t tile_min_m_);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor forward_mode(const at::Tensor& x, int64_t mode) const;
};

// ---- bf16 matrix work (qgemm/bf16.cpp)
// y [..., N] = x [..., K] @ W^T (+ bias) for an unquantized bf16 W [N, K]: fp32 x and y, fp32 accumulation.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
// A contiguous float32 tensor rounded to bfloat16 (nearest even).
at::Tensor to_bf16_tensor(const at::Tensor& x);

// ---- int8 activations (qgemm/quant_act.cpp, gemm_w8a8.cpp, gemm_w4a8.cpp; layouts in qgemm/int8.h)
// x [..., K] -> (q int8 [..., K], scale float [...]): per-token symmetric, scale = max|x| / 127.
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x);
// y [..., N] = per-token int8 x times int8 W (per-channel scales, panel layout) (+ bias), fp32 out.
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                       const at::Tensor& rowsum, const c10::optional<at::Tensor>& bias, int64_t out_features);
// y [..., N] = int8 x (per token and weight group) times 4-bit W (group scales and zero points, panel
// layout) (+ bias).
at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zero_scales, const c10::optional<at::Tensor>& bias, int64_t out_features,
                       int64_t group);
// int8 multiply-accumulates of `iters` steps of a register-only loop on every torch thread (qgemm/mac_peak.cpp)
int64_t int8_mac_peak(int64_t iters);
// The float32 [N] bias' data, or nullptr without one (checked; gemm_w8a8.cpp, used by both GEMMs).
const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N);

// ---- norms and activation (ops/norm_act.cpp)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor fused_add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& w, double eps);
at::Tensor silu_and_mul(const at::Tensor& x);

// ---- rotary and the fp32 KV write (ops/rotary.cpp)
void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin);
void rotary_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& cos_sin, const at::Tensor& slots, at::Tensor k_pool, at::Tensor v_pool);
void rotary_qkv_(const at::Tensor& qkv, int64_t Hq, int64_t Hkv, const at::Tensor& positions,
                 const at::Tensor& cos_sin);
void rotary_and_cache_qkv(const at::Tensor& qkv, int64_t Hq, int64_t Hkv, const at::Tensor& positions,
                          const at::Tensor& cos_sin, const at::Tensor& slots, at::Tensor k_pool, at::Tensor v_pool);

// ---- quantized KV write (ops/kv_quant.cpp)
void quantize_to_pool(const at::Tensor& x, const at::Tensor& slots, at::Tensor pool, at::Tensor scale_zero,
                      int64_t bits);

// ---- shared-memory all-reduce (ops/shm.cpp; the segment is lowbit/distributed/shm_allreduce.py's)
// Copies t into this rank's slot of the bank at bank_addr and publishes seq (when publish), spins up to
// max_spins for every rank's flag to reach seq, then writes the rank-ordered sum of the slots into t.
// False (t untouched) when the peers were not all there in time: the caller waits, then calls again
// with publish = false.
bool shm_all_reduce(const at::Tensor& t, int64_t flags_addr, int64_t bank_addr, int64_t slot_floats, int64_t world,
                    int64_t rank, int64_t seq, int64_t max_spins, bool publish);

// ---- paged decode attention (attention/paged_attention.cpp)
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const c10::optional<at::Tensor>& k_sz, const c10::optional<at::Tensor>& v_sz,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, int64_t kv_dtype);
at::Tensor paged_decode_attention_qkv(const at::Tensor& qkv, int64_t Hq, int64_t Hkv, int64_t B,
                                      const at::Tensor& k_pool, const at::Tensor& v_pool,
                                      const c10::optional<at::Tensor>& k_sz, const c10::optional<at::Tensor>& v_sz,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      int64_t window, int64_t kv_dtype);

}  // namespace lowbit::LOWBIT_ISA
