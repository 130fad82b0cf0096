"""Triton implementations of lowbit's ops for NVIDIA GPUs (W4A16/W8A16 GEMM and GEMV on the
AutoAWQ packing, paged decode attention over the quantized KV pool, the quantizing KV write,
fused norms/activations/rotary, sampling).

Why a lazy door: CPU machines never install triton, and `import lowbit` must not need it. This
module imports nothing heavy; `ops()` imports the kernel modules (and with them triton) on first
call. Each kernel has a pure-torch reference in `ref.py` that the tests compare against.

Interpreter: with TRITON_INTERPRET=1 set *before the kernel modules are imported* (triton reads it
when `@triton.jit` decorates), every kernel runs on CPU tensors through triton's numpy
interpreter; that is how the CPU test suite checks them. Without it the kernels need CUDA tensors.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

#: op name -> (module, function): what `ops()` returns, resolved lazily.
_OPS = {
    "awq_gemm": ("quant_gemm", "awq_matmul"),  # W4A16 (AutoAWQ GEMM packing), any M
    "w8a16_gemm": ("quant_gemm", "w8_matmul"),  # W8A16 (layouts.W8Layout), any M
    "quant_matmul": ("quant_gemm", "quant_matmul"),  # either, from a layouts.PackedWeight
    "paged_decode_attention": ("paged_attention", "paged_decode_attention"),
    "kv_write": ("kv_write", "write_kv"),
    "rms_norm": ("elementwise", "rms_norm"),
    "fused_add_rms_norm": ("elementwise", "fused_add_rms_norm"),
    "silu_and_mul": ("elementwise", "silu_and_mul"),
    "rotary_": ("elementwise", "rotary_"),
    "greedy": ("sampling", "greedy"),
    "sample": ("sampling", "sample"),
}

OP_NAMES = tuple(_OPS)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules: import blocked
        return False


def available() -> bool:
    """Whether the triton ops can run here: triton importable, and CUDA present or the interpreter
    switched on. Cheap, never raises, and imports triton only when it is installed."""
    if not triton_installed():
        return False
    if interpreting():
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA setup: treat as absent
        return False


def ops() -> dict[str, Callable]:
    """op name -> triton implementation (imports triton). Raises ImportError without triton."""
    if not triton_installed():
        raise ImportError("the triton ops need the `triton` package: pip install 'lowbit[gpu]'")
    out = {}
    for name, (mod, fn) in _OPS.items():
        module = importlib.import_module(f"{__name__}.{mod}")
        out[name] = getattr(module, fn)
    return out
