"""The Llama-family decoder shared by every supported architecture.

Module and parameter names follow Hugging Face checkpoints (model.layers.N.self_attn.q_proj, ...)
so weights, quantizers and checkpoint formats all address layers by the same names. After loading,
`fuse_projections` may merge q/k/v and gate/up into single matmuls for speed.

The residual stream runs vLLM-style: each layer gets the previous sublayer's output and the
running residual, adds them in place fused with its input norm (lowbit/layers/ops.py), and hands
back (mlp output, residual). Module outputs are never modified in place (calibration hooks keep
references to them), and `DecoderLayer.forward(h)` leaves `h` untouched.

Engine decode steps take a lean loop (`CausalLM._forward_lean`): the same kernels in the same
order as the module path, called directly (no nn.Module dispatch, no per-op checks), so a token
costs ~10 extension calls per layer. It runs only when nothing could tell the difference: fused
projections, fp32 activations, the fused-op extension built, and no hooks on any module it skips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import kernels, ops
from ..layers.attention import AttentionContext, causal_attention
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_proj: nn.Module | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, ctx: AttentionContext | None
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        q, k, v = self.project_qkv(x)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx is None:
            q, k = rotary(positions, q, k)
            o = causal_attention(q, k, v, self.window)
        elif getattr(ctx, "fuses_rotary", False):
            # rotary, the KV-cache write and attention in as few kernel calls as the context can
            o = ctx.attend_rotary(self.layer_idx, q, k, v, rotary)
        else:
            rotary.apply_(positions, q, k)  # q/k are this layer's fresh projections: safe in place
            o = ctx.attend(self.layer_idx, q, k, v)
        return self.o_proj(o.reshape(*lead, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, ctx: AttentionContext | None = None
    ) -> torch.Tensor:
        """h -> h + attn + mlp as a new tensor; h itself is not modified (calibration keeps it)."""
        x, residual = self.forward_residual(h, None, positions, rotary, ctx, owns_x=False)
        return residual.add_(x)

    def forward_residual(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        ctx: AttentionContext | None = None,
        owns_x: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output not yet added to `residual`, or (residual None) the
        stream itself. Returns (this layer's mlp output, residual); residual is updated in place,
        and so is x when it starts the stream and owns_x says the caller owns it."""
        if residual is None:
            residual = x if owns_x else x.clone()
            x = self.input_layernorm(residual)
        else:
            x = self.input_layernorm.forward_add(x, residual)
        x = self.self_attn(x, positions, rotary, ctx)
        x = self.post_attention_layernorm.forward_add(x, residual)
        return self.mlp(x), residual


@dataclass
class _LeanLayer:
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


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


_QuantLinear: type | None = None


def _direct(m: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The call a linear module's forward ends in (its bound kernel handle), or None."""
    global _QuantLinear
    if m is None or m._forward_hooks or m._forward_pre_hooks:
        return None
    kind = type(m)
    if kind is nn.Linear:
        w, b = m._parameters["weight"], m._parameters["bias"]
        return lambda x: F.linear(x, w, b)
    if _QuantLinear is None:
        from ..layers.linear import QuantLinear as _QuantLinear  # noqa: N811 - cached class
    if kind is _QuantLinear:
        handle = m._handle or m._bind()
        return handle.forward if handle is not False else None
    direct = getattr(m, "direct", None)  # a wrapper (layers/permuted.py): its inner module's call
    if direct is not None:
        inner = _direct(m._modules.get("inner"))
        return direct(inner) if inner is not None else None
    return None


def _lean_layer(layer: "DecoderLayer") -> _LeanLayer | None:
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
    return _LeanLayer(attn.layer_idx, w_in, n_in.eps, w_post, n_post.eps, qkv, o, gate_up, down,
                      attn.num_heads, attn.num_kv_heads)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """forward() returns final hidden states; compute_logits() applies the LM head (so the engine
    only pays for the rows it samples from)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, min(cfg.max_position_embeddings, 4096), cfg.rope)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, T] without ctx (positions default to 0..T-1), or [N] flat tokens with ctx."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
        if ctx is not None and getattr(ctx, "lean", False):
            lean = self._lean_plan()
            if lean is not None:
                out = self._forward_lean(lean, input_ids, ctx)
                if out is not None:
                    return out
        if ctx is not None:  # grow the rotary table once per step, not once per layer
            top = getattr(ctx, "max_position", None)
            if top is None and positions.numel():
                top = int(positions.max())
            if top is not None:
                self.rotary.ensure(top)
        # The engine (ctx given, no hooks) lets the stream update the fresh embedding in place;
        # other callers get a copy, so a hooked embedding output is never modified.
        x, residual, owns = self.embed(input_ids), None, ctx is not None
        for layer in self.model.layers:
            x, residual = layer.forward_residual(x, residual, positions, self.rotary, ctx, owns_x=owns)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm.forward_add(x, residual)

    def _lean_plan(self) -> list[_LeanLayer] | None:
        """Per-layer direct calls for the lean loop, or None where the module path must run.

        Rebuilt every step (~2 us per layer) rather than cached, so a module swapped, re-bound
        or hooked after loading is always seen.
        """
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        dec = self._modules["model"]
        if _hooked(self) or _hooked(dec) or _hooked(dec._modules["norm"]):
            return None
        plan = []
        for layer in dec._modules["layers"]._modules.values():
            p = _lean_layer(layer)
            if p is None:
                return None
            plan.append(p)
        return plan

    def _forward_lean(self, plan: list[_LeanLayer], input_ids: torch.Tensor, ctx) -> torch.Tensor | None:
        """forward() of a pure decode step: the module path's kernels in its order, called directly."""
        ext = kernels.OPS.get()
        x = self.embed(input_ids)
        if ext is None or x.dtype != torch.float32 or x.dim() != 2:
            return None
        if ctx.max_position is not None:
            self.rotary.ensure(ctx.max_position)
        cos_sin = self.rotary.cos_sin
        norm = self._modules["model"]._modules["norm"]
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def fuse_projections(self, fuse=None) -> None:
        """Merge q/k/v and gate/up into one matmul each (fewer, larger kernel calls per token).

        `fuse(modules) -> module | None` concatenates along the output dimension; the default
        handles nn.Linear. The original modules are dropped to free memory.
        """
        fuse = fuse or fuse_linear
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            if a.qkv_proj is None:
                merged = fuse([a.q_proj, a.k_proj, a.v_proj])
                if merged is not None:
                    a.qkv_proj = merged
                    del a.q_proj, a.k_proj, a.v_proj
            if m.gate_up_proj is None:
                merged = fuse([m.gate_proj, m.up_proj])
                if merged is not None:
                    m.gate_up_proj = merged
                    del m.gate_proj, m.up_proj


def fuse_linear(mods: list[nn.Module]) -> nn.Module | None:
    if not all(type(m) is nn.Linear for m in mods):
        return None
    has_bias = mods[0].bias is not None
    out = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=has_bias)
    out.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
    if has_bias:
        out.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    return out
