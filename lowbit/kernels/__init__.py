"""lowbit's kernel layer: the C++ CPU kernels built at install (one module per instruction-set
variant, setup.py), the pure-torch references, and the registry that picks one implementation per
op at first use.

A leaf package: it imports torch and the standard library, nothing else from lowbit, so every layer
above (layers, models, engine) can use it and a new backend plugs in here only.

Call sites:
    ext = kernels.OPS.get()      # fused decode ops (rms_norm, rotary_, paged_decode_attention, ...)
    ext = kernels.QGEMM.get()    # quantized linear (QLinear, dequantize); kernels.get() is the same
    ext = kernels.INT8.get()     # int8-activation GEMMs (quantize_per_token, w8a8_linear, w4a8_linear)
    ext = kernels.BENCH.get()    # machine peaks with the kernels' own instructions (int8_mac_peak)
Each returns an object whose attributes are the chosen compiled functions, or None when the torch
reference runs (no usable variant, or LOWBIT_ISA=ref / LOWBIT_NO_EXT=1). `lowbit env` prints every
choice and why; `reset()` makes the next call choose again (tests flip LOWBIT_ISA).
"""
from __future__ import annotations

from .errors import KernelConfigError
from .registry import OPS as OP_SPECS, Choice, OpSet, Registry
from .variants import VARIANTS, Variant

#: The process's registry (this machine's CPU, the environment, the installed builds).
REGISTRY = Registry()
QGEMM = REGISTRY.family("qgemm")
OPS = REGISTRY.family("ops")
INT8 = REGISTRY.family("int8")
BENCH = REGISTRY.family("bench")

__all__ = [
    "KernelConfigError", "OP_SPECS", "Choice", "OpSet", "Registry", "VARIANTS", "Variant",
    "REGISTRY", "QGEMM", "OPS", "INT8", "BENCH", "get", "available", "reset", "choices", "usable_variants",
    "BF16_FLAGS", "native_bf16",
]


def get() -> OpSet | None:
    """The quantized-linear ops (QLinear, dequantize), or None when the torch path must be used."""
    return QGEMM.get()


def available() -> bool:
    """Whether the compiled quantized-linear kernels will be used."""
    return QGEMM.get() is not None


#: CPU flags that make bf16 matrix work native (dot products in hardware, fp32 accumulation).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16): EngineArgs.dtype=auto's test."""
    return any(f in REGISTRY.cpu.flags for f in BF16_FLAGS)


def reset() -> None:
    """Forgets every choice, so LOWBIT_ISA / LOWBIT_NO_EXT are read again at the next use."""
    REGISTRY.reset()


def choices() -> dict[str, Choice]:
    """Op name -> what runs it and why."""
    return REGISTRY.choices()


def usable_variants() -> list[str]:
    """Names of the variants this CPU runs and this install built, best first (loads nothing)."""
    return [b.variant.name for b in REGISTRY.builds() if not b.missing and b.path is not None]
