"""bf16 matrix work with fp32 accumulation: `EngineArgs.dtype = "bfloat16"` (auto where the CPU has native
bf16 dot products).

Why: vLLM-CPU runs bf16 by default, and on CPUs with AVX512_BF16 or AMX-BF16 oneDNN's bf16 GEMM runs
3-6x the fp32 sgemm's rate at the batch widths of continuous batching and prefill. An unquantized
weight stored in bf16 also halves the bytes a batch-1 decode step streams. Only the matrix
multiplies change: activations between layers, norms, rotary and attention stay fp32, so the
residual stream never accumulates bf16 rounding (the KV cache is stored as bf16 under
kv_cache_dtype auto: lowbit/engine/kv_cache.py).

* nn.Linear -> Bf16Linear: the weight kept as bf16 (the fp32 copy is dropped); small M runs the
  compiled gemv (bf16 widened exactly, x in fp32), larger M the bf16 matmul (qgemm/bf16.cpp).
* a tied embedding shares the LM head's bf16 table (Bf16Embedding), so it is not stored twice.
* QuantLinear keeps its packed weight; from BF16_MIN_M rows on, its tiles are dequantized into bf16
  and multiplied in bf16 instead of fp32 (below that its gemv, bandwidth-bound, is unchanged).
* int8-activation layers (W8A8, W4A8) are left as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .kernel_linear import KernelLinear
from .linear import QuantLinear

#: From this many activation rows on a QuantLinear multiplies in bf16 (EngineArgs.dtype = bfloat16).
#: Below it the decode gemv (int16 x, W streamed once) and the blocked fp32 kernel are faster.
#: Measured (the default model's four W4 g64 linear shapes, 2 threads, Xeon with AMX, medians of 9):
#: M = 16 bf16 tiles 0.83 ms vs blocked fp32 0.73; M = 24 0.89 vs 1.01; M = 64 1.20 vs 1.91 (tiled
#: sgemm); M = 256 2.24 vs 6.66; M = 1024 6.71 vs 25.1.
BF16_MIN_M = 24


class Bf16Linear(KernelLinear):
    """y = x @ W^T + b with W stored as bfloat16 [out, in] and the bias in fp32; x and y are fp32."""

    _op = "bf16_linear"
    _family = kernels.QGEMM

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Bf16Linear":
        return cls(lin.weight, lin.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _args(self) -> tuple:
        return self.weight, self.bias


class Bf16Embedding(nn.Module):
    """Embedding lookup from a bf16 table (shared with a tied Bf16Linear LM head), fp32 out."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(torch.float32)


def use_bf16(model: nn.Module) -> tuple[int, int]:
    """Switches `model`'s matrix work to bf16 in place: (fp linears swapped, quantized linears switched).

    Expects a CausalLM-like model (model.model.embed_tokens, model.lm_head) but works on any module:
    only nn.Linear (exact type) and QuantLinear children are touched.
    """
    head = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = (type(head) is nn.Linear and type(emb) is nn.Embedding and head.weight is emb.weight)
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    shared = None
    for parent, name, child in swaps:
        new = Bf16Linear.from_linear(child)
        if tied and child is head:
            shared = new.weight
        setattr(parent, name, new)
    if shared is not None:
        model.model.embed_tokens = Bf16Embedding(shared)
    switched = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bf16_min_m == 0:
            m.set_bf16_min_m(BF16_MIN_M)
            switched += 1
    return len(swaps), switched
