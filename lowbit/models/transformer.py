"""The Llama-family decoder shared by every supported architecture.

Module and parameter names follow Hugging Face checkpoints (model.layers.N.self_attn.q_proj, ...)
so weights, quantizers and checkpoint formats all address layers by the same names. After loading,
`fuse_projections` may merge q/k/v and gate/up into single matmuls for speed.

The residual stream runs vLLM-style: each layer gets the previous sublayer's output and the
running residual, adds them in place fused with its input norm (lowbit/layers/ops.py), and hands
back (mlp output, residual). Module outputs are never modified in place (calibration hooks keep
references to them), and `DecoderLayer.forward(h)` leaves `h` untouched.

This file is the architecture and its weight names only. How the engine executes it (the lean
decode loop that calls the same kernels without nn.Module dispatch) lives on the engine side,
lowbit/engine/executor.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ops
from ..layers.attention import AttentionContext, causal_attention
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .config import ModelConfig


def rotary_for(cfg: ModelConfig) -> RotaryEmbedding:
    """The model's rotary table (positions up to 4096 up front, grown on demand). Built on the CPU even
    inside a `torch.device("meta")` block: it is computed, never loaded, so a model built on meta
    and filled from a checkpoint has a real table without rebuilding it."""
    with torch.device("cpu"):
        return RotaryEmbedding(cfg.head_dim, min(cfg.max_position_embeddings, 4096), cfg.rope)


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


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Always built on the meta device and assigned real weights after. Handing nn.Embedding its
        # (meta) weight skips its random normal_ init, which on meta runs through torch._refs and imports
        # torch._dynamo: 1.6 s of every command's start-up.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
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
        self.rotary = rotary_for(cfg)

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
    # on meta: the parameters are replaced just below, so a real-device init would be wasted work
    out = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=has_bias, device="meta")
    out.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
    if has_bias:
        out.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    return out
