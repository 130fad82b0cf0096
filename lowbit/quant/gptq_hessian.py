"""The Hessians GPTQ rounds each linear of a decoder layer against, gathered while the layer runs.

A linear's output error over calibration inputs X is tr(D H D^T) / 2 with H = 2 X^T X / n, so
GPTQ needs, per linear, the input statistics that weigh its error the way the model does.

* q/k (one input), o_proj, gate/up (one input), down_proj: H of the linear's own input. Forward
  hooks on the first linear of each input accumulate it (q_proj's input is k_proj's,
  gate_proj's is up_proj's).
* v_proj: H of the inputs *as the attention mixes them*. v only reaches the layer's output
  through attention: head j outputs A_j X W_g^T, with A_j its attention probabilities and g its
  kv head, so the error that matters is A_j X D_g^T and kv head g's Hessian is
  H_g = 2/n sum_{j in g} (A_j X)^T (A_j X), one per kv head. Why not the plain input Hessian:
  attention puts much of its mass on a few tokens (the first token of a sequence, the "sink"),
  which are a tiny share of X^T X; GPTQ then moves error onto exactly those tokens' directions.
  Measured on the default model, W4 g64, layer 3: plain-H GPTQ of v_proj alone gave a layer
  output error of 0.054 against RTN's 0.028; the attention-weighted H gives 0.0026 (q/k/v all
  rounded: 0.057 -> 0.0055).
  A_j X is one attention call with X itself as the value (value width = hidden size). That call
  and the per-head sums cost about as much as the rest of the layer's Hessians, so only every
  QUERY_STRIDE-th query position (ending at the last) contributes: H_g is a sum over query rows,
  and an even subsample of them estimates it well (layer 3 above: 0.0026 with every row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.transformer import Attention, DecoderLayer
from .gptq import HessianAccumulator
from .rtn import linear_names

V_PROJ = "self_attn.v_proj"
QUERY_STRIDE = 4

# Linears that read the same tensor share one Hessian: hooked once, on the first of them.
SHARED_INPUT = {
    "self_attn.k_proj": "self_attn.q_proj",
    "mlp.up_proj": "mlp.gate_proj",
}


def hessian_source(linear: str) -> str:
    return SHARED_INPUT.get(linear, linear)


def input_source(linear: str) -> str:
    """The source whose plain input Hessian is the linear's own input (v_proj reads q_proj's)."""
    return "self_attn.q_proj" if linear == V_PROJ else hessian_source(linear)


class AttentionHessian:
    """Per kv head g: H_g = 2/n sum_{q heads j of g} (A_j X)^T (A_j X), A_j head j's causal
    attention probabilities, X the attention's input; fed by a forward pre-hook on the attention."""

    def __init__(self, attn: Attention, query_stride: int = QUERY_STRIDE) -> None:
        self.attn = attn
        self.query_stride = query_stride
        self.acc = [HessianAccumulator(attn.v_proj.in_features) for _ in range(attn.num_kv_heads)]

    @torch.no_grad()
    def hook(self, attn: Attention, args: tuple) -> None:
        x, positions, rotary = args[0], args[1], args[2]
        lead = x.shape[:-1]
        # F.linear, not the modules: their own Hessian hooks must not see these calls
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(*lead, attn.num_heads, attn.head_dim)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(*lead, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotary(positions, q, k)
        t = x.shape[-2]
        rows = torch.arange(t - 1, -1, -self.query_stride).flip(0)  # query positions kept
        keys = torch.arange(t)
        mask = keys[None, :] <= rows[:, None]
        if attn.window is not None:
            mask &= rows[:, None] - keys[None, :] < attn.window
        values = x.unsqueeze(-3).expand(*lead[:-1], attn.num_kv_heads, t, x.shape[-1])
        mixed = F.scaled_dot_product_attention(  # [B, Hq, rows, hidden]: rows of A_j X per head
            q[..., rows, :, :].transpose(-3, -2), k.transpose(-3, -2), values, attn_mask=mask, enable_gqa=True)
        rep = attn.num_heads // attn.num_kv_heads
        for g, acc in enumerate(self.acc):
            acc.add(mixed[..., g * rep : (g + 1) * rep, :, :])

    def hessians(self) -> list[torch.Tensor]:
        return [a.hessian() for a in self.acc]


class HessianCapture:
    """Forward hooks that accumulate every Hessian of a layer while it runs (a context manager:
    the hooks live only inside `with`). sources: the inputs to watch (hessian_source names),
    default all of the layer's."""

    def __init__(self, layer: DecoderLayer, sources: list[str] | None = None) -> None:
        self.layer = layer
        self.sources = sources if sources is not None else sorted({hessian_source(n) for n in linear_names(layer)})
        self.acc = {s: HessianAccumulator(layer.get_submodule(s).in_features) for s in self.sources if s != V_PROJ}
        self.attn = AttentionHessian(layer.self_attn) if V_PROJ in self.sources else None
        self._scaled: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> "HessianCapture":
        for s, acc in self.acc.items():
            self._handles.append(self.layer.get_submodule(s).register_forward_hook(
                lambda _m, args, _out, acc=acc: acc.add(args[0])))
        if self.attn is not None:
            self._handles.append(self.layer.self_attn.register_forward_pre_hook(self.attn.hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def act_order(self, linear: str) -> torch.Tensor:
        """Descending diagonal of the linear's plain input Hessian: the act order its input
        shares with every other linear reading that input."""
        return torch.argsort(torch.diagonal(self.hessian(input_source(linear))), descending=True, stable=True)

    def hessian(self, linear: str) -> torch.Tensor | list[torch.Tensor]:
        """The linear's H, or for v_proj one H per kv head."""
        src = hessian_source(linear)
        if src in self._scaled:
            return self._scaled[src]
        return self.attn.hessians() if src == V_PROJ else self.acc[src].hessian()

    def scale_inputs(self, linears: tuple[str, ...], scales: torch.Tensor) -> None:
        """The linears' input was divided by `scales` (AWQ folding): H -> diag(1/s) H diag(1/s)
        (A X scales by column as X does, so v_proj's per-head Hessians transform alike)."""
        inv = 1.0 / scales.float()
        for src in dict.fromkeys(hessian_source(n) for n in linears):
            h = self.hessian(src)
            scaled = [x * inv.view(-1, 1) * inv.view(1, -1) for x in (h if isinstance(h, list) else [h])]
            self._scaled[src] = scaled if isinstance(h, list) else scaled[0]
