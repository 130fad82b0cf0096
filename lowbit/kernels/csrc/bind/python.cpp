// The Python module of this variant (lowbit.kernels._cpu_<variant>): direct pybind11 bindings of
// the same functions the dispatcher has (bind/torch_ops.cpp), for the decode hot path, where a
// torch.ops call costs more than the kernel it runs (measured figures in lowbit/kernels/registry.py).
// Importing the module also runs the TORCH_LIBRARY registration of torch_ops.cpp.
#include <torch/csrc/utils/pybind.h>

#include "../api.h"
#include "../qgemm/amx.h"

#if __has_include("sources_hash.h")
#include "sources_hash.h"  // written by setup.py into the build directory
#endif
#ifndef LOWBIT_SOURCES_HASH
#define LOWBIT_SOURCES_HASH ""
#endif

namespace ops = lowbit::LOWBIT_ISA;

// Kernels run without the GIL (they touch tensors only): the server's event loop thread keeps
// streaming while the engine thread is inside a kernel.
#define kNoGil pybind11::call_guard<pybind11::gil_scoped_release>()

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = LOWBIT_STR(LOWBIT_ISA);
  m.attr("torch_namespace") = LOWBIT_STR(LOWBIT_TORCH_NS);
  m.attr("sources_hash") = LOWBIT_SOURCES_HASH;  // of csrc/ at build time (setup.py): staleness check

  pybind11::class_<ops::Handle>(m, "QLinear")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>, int64_t, int64_t,
                          int64_t, int64_t, int64_t>())
      .def("forward", &ops::Handle::forward, kNoGil, "y = x @ W^T + b (fp32 compute)")
      .def("forward_mode", &ops::Handle::forward_mode, kNoGil, "forward with a forced kernel (benchmarks/tests)")
      .def_readwrite("bf16_min_m", &ops::Handle::bf16_min_m, "from this many rows on the matmul runs in bf16 (0: never)");
  m.def("bf16_linear", &ops::bf16_linear, kNoGil, "y = x @ W^T + b for a bf16 W: fp32 x/y, fp32 accumulation");
  m.def("dequantize", &ops::dequantize, kNoGil, "dequantize packed rows to fp32");
  m.def("amx_bf16_active", &ops::amx_bf16_active, "whether bf16 GEMMs from 16 rows on run on AMX tiles");
  m.def("set_amx_enabled", &ops::set_amx_enabled,
        "turn the AMX bf16 path on/off for the process (tests, benchmarks); returns the previous setting");

  m.def("quantize_per_token", &ops::quantize_per_token, kNoGil,
        "x [..., K] -> (int8 q, float scale [...]): per-token symmetric int8 activations");
  m.def("w8a8_linear", &ops::w8a8_linear, kNoGil, "int8 x (per token) @ int8 W^T (per channel), fp32 out");
  m.def("w4a8_linear", &ops::w4a8_linear, kNoGil, "int8 x (per token and group) @ 4-bit W^T (groups, zero points), fp32 out");
  m.def("int8_mac_peak", &ops::int8_mac_peak, kNoGil, "int8 products of a register-only peak loop on every thread");

  m.def("rms_norm", &ops::rms_norm, kNoGil, "w * x / rms(x) over rows of a [M, n] fp32 tensor");
  m.def("fused_add_rms_norm", &ops::fused_add_rms_norm, kNoGil, "residual += x (in place); return rms_norm(residual)");
  m.def("silu_and_mul", &ops::silu_and_mul, kNoGil, "[M, 2I] -> silu(x[:, :I]) * x[:, I:]");
  m.def("rotary_", &ops::rotary_, kNoGil, "rotary on q [N, Hq, D] and k [N, Hkv, D] in place");
  m.def("rotary_and_cache", &ops::rotary_and_cache, kNoGil,
        "rotary on q, k in place; store k, v at slots of fp32 pools");
  m.def("quantize_to_pool", &ops::quantize_to_pool, kNoGil,
        "per-token, per-head asymmetric int8/int4 codes of x [N, H, D] stored at slots of a uint8 pool");
  m.def("shm_all_reduce", &ops::shm_all_reduce, kNoGil,
        "publish t into a shared-memory slot, wait for every rank, sum the slots in rank order into t");
  m.def("paged_decode_attention", &ops::paged_decode_attention, kNoGil, "one-token attention over paged K/V blocks");
  m.def("rotary_qkv_", &ops::rotary_qkv_, kNoGil, "rotary_ on the q and k parts of a fused [N, (Hq + 2 Hkv) D] qkv");
  m.def("rotary_and_cache_qkv", &ops::rotary_and_cache_qkv, kNoGil, "rotary_and_cache on a fused qkv");
  m.def("paged_decode_attention_qkv", &ops::paged_decode_attention_qkv, kNoGil,
        "paged_decode_attention for the first B rows of a fused qkv -> [B, Hq * D]");
}
