"""GPTQ of one decoder layer in a single quantized pass, sub-block by sub-block.

The layer is walked in data-flow order; each stage streams the calibration chunks through the
part of the layer that is already rounded, accumulates the Hessian of the next sub-block's
input, and rounds that sub-block:

  1. x1 = input_layernorm(h)                      -> H of x1        -> q, k
  2. attention probabilities of the rounded q, k  -> H_g of A X     -> v (per kv head, gptq_hessian)
  3. a = attention(x1) with rounded q, k, v       -> H of a         -> o_proj
  4. r = h + o(a), x2 = post_attention_layernorm(r) -> H of x2      -> gate, up
  5. m = silu(gate x2) * up x2                    -> H of m         -> down_proj
  6. out = r + down(m)                            -> the next layer's calibration inputs

Why this shape: every Hessian describes the inputs the *quantized* layer produces ("true
sequential", as AutoGPTQ does), and the pass that yields them also yields the next layer's
inputs, so a layer costs about one forward pass over the calibration data instead of two (an fp
pass for the Hessians plus the pipeline's propagate). The attention inputs a and (within
ACT_CACHE_BYTES) the MLP's m are kept between stages, float16 where they fit (ActivationStore);
beyond that m is computed again, which bounds memory on large models.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from .activations import ActivationStore, positions_for
from .gptq import GptqConfig, GptqResult, HessianAccumulator, act_order, gptq_quantize_heads, gptq_quantize_shared
from .gptq_hessian import AttentionHessian
from .rtn import QuantSpec

ACT_CACHE_BYTES = 512 << 20  # keep the MLP's inner activations between stages 5 and 6 below this

QK = ("self_attn.q_proj", "self_attn.k_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


@dataclass
class SequentialOutput:
    results: dict[str, GptqResult]  # every linear's GPTQ result (its dequantized weight is loaded)
    next_store: ActivationStore  # the rounded layer's outputs: the next layer's inputs


@contextmanager
def _bypassed(parent: nn.Module, name: str) -> Iterator[None]:
    """parent.<name> is the identity inside the block: the attention returns o_proj's input, the
    MLP down_proj's input, through their own forward code."""
    module = getattr(parent, name)
    setattr(parent, name, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, name, module)


def _load(layer: DecoderLayer, found: dict[str, GptqResult]) -> dict[str, GptqResult]:
    for name, r in found.items():
        lin = layer.get_submodule(name)
        lin.weight.data = r.dequantize().to(lin.weight.dtype)
    return found


class _Rounder:
    """GPTQ of named linears of one layer with optional AWQ clip thresholds, loading each result."""

    def __init__(self, layer: DecoderLayer, spec: QuantSpec, cfg: GptqConfig, thresholds: dict[str, torch.Tensor]):
        self.layer, self.spec, self.cfg, self.thresholds = layer, spec, cfg, thresholds
        self.results: dict[str, GptqResult] = {}

    def shared(self, names: tuple[str, ...], h: torch.Tensor) -> None:
        ws = [self.layer.get_submodule(n).weight.data for n in names]
        found = gptq_quantize_shared(ws, h, self.spec, self.cfg, [self.thresholds.get(n) for n in names])
        self.results.update(_load(self.layer, dict(zip(names, found))))

    def heads(self, name: str, hs: list[torch.Tensor], order: torch.Tensor | None) -> None:
        w = self.layer.get_submodule(name).weight.data
        found = gptq_quantize_heads(w, hs, self.spec, self.cfg, self.thresholds.get(name), order)
        self.results.update(_load(self.layer, {name: found}))


@torch.no_grad()
def gptq_sequential(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, spec: QuantSpec, cfg: GptqConfig,
    thresholds: dict[str, torch.Tensor] | None = None, act_cache_bytes: int = ACT_CACHE_BYTES,
) -> SequentialOutput:
    """Stages 1-6 of the module docstring on `layer` (modified in place: on return its linears hold
    their dequantized GPTQ weights). thresholds: AWQ clip thresholds per linear (awq-gptq)."""
    attn, mlp = layer.self_attn, layer.mlp
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    rounder = _Rounder(layer, spec, cfg, thresholds or {})

    h_x1 = HessianAccumulator(attn.q_proj.in_features)  # 1
    for h in store:
        h_x1.add(ln1(h))
    hx1 = h_x1.hessian()
    rounder.shared(QK, hx1)

    attn_h = AttentionHessian(attn)  # 2
    for h in store:
        attn_h.add(ln1(h), positions_for(h), rotary)
    rounder.heads("self_attn.v_proj", attn_h.hessians(), act_order(hx1) if cfg.act_order is not None else None)
    del hx1, attn_h

    h_a, mixed = HessianAccumulator(attn.o_proj.in_features), ActivationStore()  # 3
    with _bypassed(attn, "o_proj"):
        for h in store:
            a = attn(ln1(h), positions_for(h), rotary, None)
            h_a.add(a)
            mixed.append(a)
    rounder.shared(("self_attn.o_proj",), h_a.hessian())

    def residual() -> Iterator[torch.Tensor]:
        for h, a in zip(store, mixed):
            yield h + attn.o_proj(a)

    h_x2 = HessianAccumulator(mlp.gate_proj.in_features)  # 4
    for r in residual():
        h_x2.add(ln2(r))
    rounder.shared(GATE_UP, h_x2.hessian())

    keep = store.n_tokens * mlp.down_proj.in_features * 2 <= act_cache_bytes  # 5
    h_m, inner = HessianAccumulator(mlp.down_proj.in_features), ActivationStore()
    with _bypassed(mlp, "down_proj"):
        for r in residual():
            m = mlp(ln2(r))
            h_m.add(m)
            if keep:
                inner.append(m)
    rounder.shared(("mlp.down_proj",), h_m.hessian())

    out, down = ActivationStore(), mlp.down_proj  # 6
    for r, m in zip(residual(), inner) if keep else ((r, None) for r in residual()):
        if m is None:
            with _bypassed(mlp, "down_proj"):
                m = mlp(ln2(r))
        out.append(r.add_(down(m)))
    return SequentialOutput(rounder.results, out)
