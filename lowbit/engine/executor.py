"""Runs the decoder for one engine step on the CPU: a lean loop for pure decode steps, else the module path.

Why a second way to run the same model: a decode step of a small model is dominated by per-op
dispatch, not arithmetic. The lean loop calls the same kernels in the same order as the module
path (lowbit/models/transformer.py), directly (no nn.Module dispatch, no per-op checks), so a token
costs ~10 extension calls per layer. It runs only when nothing could tell the difference: fused
projections, fp32 activations, the fused-op extension built, a context that says the step is a
pure decode the fused kernels run whole (`ctx.lean`), and no hooks on any module it skips.
The results are bit-identical to `model(input_ids, positions, ctx)` (tests/test_fused_ops.py).

The architecture stays in models/; this file is how the CPU engine executes it. A GPU backend
adds its own executor next to this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..layers.linear import QuantLinear
from ..layers.linear_bf16 import Bf16Linear
from ..layers.linear_int8 import W4A8Linear, W8A8Linear
from ..layers.permuted import InputPermuted
from ..layers.tp_linear import RowParallel
from ..models.transformer import CausalLM, DecoderLayer


@dataclass
class LeanLayer:
    """What the lean decode loop needs from one DecoderLayer, resolved once per step."""

    idx: int
    w_in: torch.Tensor
    eps_in: float
    w_post: torch.Tensor
    eps_post: float
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    num_kv_heads: int


def execute(model: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
    """`model(input_ids, positions, ctx)`: final hidden states of the step's flat tokens."""
    if getattr(ctx, "lean", False):
        plan = lean_plan(model)
        if plan is not None:
            out = forward_lean(model, plan, input_ids, ctx)
            if out is not None:
                return out
    return model(input_ids, positions, ctx)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _direct(m: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The call a linear module's forward ends in (its bound kernel handle), or None."""
    if m is None or m._forward_hooks or m._forward_pre_hooks:
        return None
    kind = type(m)
    if kind is nn.Linear:
        w, b = m._parameters["weight"], m._parameters["bias"]
        return lambda x: F.linear(x, w, b)
    if kind is QuantLinear:
        handle = m._handle or m._bind()
        return handle.forward if handle is not False else None
    if kind is W8A8Linear or kind is W4A8Linear or kind is Bf16Linear:
        return m.direct()
    # act-order GPTQ (the input gather) or tensor parallel (the all-reduce, the bias) around the
    # inner linear's own call
    if kind is InputPermuted or kind is RowParallel:
        inner = _direct(m._modules["inner"])
        return m.direct(inner) if inner is not None else None
    return None


def _lean_layer(layer: DecoderLayer) -> LeanLayer | None:
    lm = layer._modules
    attn, mlp, n_in, n_post = lm["self_attn"], lm["mlp"], lm["input_layernorm"], lm["post_attention_layernorm"]
    if (_hooked(layer) or _hooked(attn) or _hooked(mlp) or _hooked(n_in) or _hooked(n_post)
            or attn.q_norm is not None):
        return None
    am, mm = attn._modules, mlp._modules
    qkv, o, gate_up, down = (_direct(am.get("qkv_proj")), _direct(am.get("o_proj")),
                             _direct(mm.get("gate_up_proj")), _direct(mm.get("down_proj")))
    w_in, w_post = n_in._parameters["weight"], n_post._parameters["weight"]
    if (qkv is None or o is None or gate_up is None or down is None or w_in.dtype != torch.float32
            or w_post.dtype != torch.float32):
        return None
    return LeanLayer(attn.layer_idx, w_in, n_in.eps, w_post, n_post.eps, qkv, o, gate_up, down,
                     attn.num_heads, attn.num_kv_heads)


def lean_plan(model: CausalLM) -> list[LeanLayer] | None:
    """Per-layer direct calls for the lean loop, or None where the module path must run.

    Rebuilt every step (~2 us per layer) rather than cached, so a module swapped, re-bound
    or hooked after loading is always seen.
    """
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    dec = model._modules["model"]
    if _hooked(model) or _hooked(dec) or _hooked(dec._modules["norm"]):
        return None
    plan = []
    for layer in dec._modules["layers"]._modules.values():
        p = _lean_layer(layer)
        if p is None:
            return None
        plan.append(p)
    return plan


def forward_lean(model: CausalLM, plan: list[LeanLayer], input_ids: torch.Tensor, ctx) -> torch.Tensor | None:
    """CausalLM.forward of a pure decode step: the module path's kernels in its order, called
    directly. None when the step cannot take this path (the caller runs the module path)."""
    ext = kernels.OPS.get()
    x = model.embed(input_ids)
    if ext is None or x.dtype != torch.float32 or x.dim() != 2:
        return None
    rotary = model.rotary
    if ctx.max_position is not None:
        rotary.ensure(ctx.max_position)
    cos_sin = rotary.cos_sin
    norm = model._modules["model"]._modules["norm"]
    residual = x  # the fresh embedding carries the residual stream
    for i, p in enumerate(plan):
        if i == 0:
            x = ext.rms_norm(residual, p.w_in, p.eps_in)
        else:
            x = ext.fused_add_rms_norm(x, residual, p.w_in, p.eps_in)
        o = ctx.attend_qkv(p.idx, p.qkv(x), p.num_heads, p.num_kv_heads, cos_sin)
        x = ext.fused_add_rms_norm(p.o(o), residual, p.w_post, p.eps_post)
        x = p.down(ext.silu_and_mul(p.gate_up(x)))
    if not plan:
        return ext.rms_norm(residual, norm.weight, norm.eps)
    return ext.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
