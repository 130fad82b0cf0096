"""AWQ's scale search: per scale group, the ratio r of s = mean|x|^r (optionally / mean_w^(1-r))
that minimises the output error of the block consuming the group's weights, and the folding of s.

Why the loss is measured on the block's output (the attention, the MLP, a lone linear) and not on
each weight: a scale helps one channel at the cost of the others, and only the output says whether
the trade paid. A lone linear (v -> o, up -> down) is scored through the Gram matrix of its inputs
when that is cheaper than running it for every grid point.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from .activations import positions_for
from .awq_config import AwqConfig, GroupResult, LayerCapture, ScaleGroup, finite
from .rtn import QuantSpec

# The heavy tokens' weight in the scale searches, relative to their true weight. Their squared
# error is huge in absolute terms but the RMSNorm after the residual divides it by their huge norm,
# so at weight 1 they steer the picks away from what the other tokens need (W4 g64, 128 x 512,
# ppl16: 24.38 / 24.61 at 1.0 vs 24.28 / 24.31 at 0.0, AWQ / CT format). They stay protected by
# the clip search, which scores them at their true weight.
HEAVY_SEARCH_WEIGHT = 0.0


def run_module(layer: DecoderLayer, name: str, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    if name == "self_attn":
        return layer.self_attn(x, positions_for(x), rotary, None)
    return layer.get_submodule(name)(x)


class SqErr:
    """Running (weighted) mean of squared error in float64 (chunked evaluation)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """a, b: [..., d]; w: optional weight per row of a (its shape a.shape[:-1])."""
        sq = (a.float() - b.float()).pow(2)
        if w is None:
            self.total += float(sq.sum())
            self.count += a.numel()
        else:
            self.total += float((sq.sum(-1) * w).sum())
            self.count += float(w.sum()) * a.shape[-1]

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan  # nothing weighed: no valid loss


def chunked_loss(layer, name, x, target, rotary, chunk_tokens: int, weights: torch.Tensor | None = None) -> float:
    """Loss over sequences [S, T, d] or tokens [n, d] (optionally weighted per token), about
    chunk_tokens tokens per call."""
    rows = max(1, chunk_tokens // x.shape[1]) if x.dim() == 3 else chunk_tokens
    err = SqErr()
    for i in range(0, x.shape[0], rows):
        w = None if weights is None else weights[i : i + rows]
        err.add(run_module(layer, name, x[i : i + rows], rotary), target[i : i + rows], w)
    return err.mean


def _gram_pays(x: torch.Tensor, lin: nn.Linear, n_evals: int) -> bool:
    """Gram form costs n*in^2 once + in^2*out per grid point; running the linear costs n*in*out."""
    n, fin, fout = x.numel() // x.shape[-1], lin.in_features, lin.out_features
    return n * fin * fin + n_evals * fin * fin * fout < n_evals * n * fin * fout


def gram_of(x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """X^T diag(w) X and the total weight (the token count when unweighted)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if weights is None:
        return flat.t() @ flat, float(flat.shape[0])
    return (flat * weights.view(-1, 1)).t() @ flat, float(weights.sum())


def linear_loss(lin: nn.Linear, w_fp: torch.Tensor, gram: torch.Tensor, n: float):
    """Output MSE of a lone linear through the Gram matrix G = X^T X of its n inputs: with
    D = W_q - W, mean ||x D^T||^2 = tr(D G D^T) / (n out). Exact, and for wide inputs several times
    cheaper per grid point than running the linear over every token (the bias cancels)."""

    def measure() -> float:
        d = lin.weight.data.float() - w_fp.float()
        v = float(((d @ gram) * d).sum())
        return max(0.0, v) / (n * d.shape[0]) if math.isfinite(v) else math.inf

    return measure


def weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """AutoAWQ's duo term: mean over rows of |w| normalised by its group's max |w|."""
    w = torch.cat(weights, dim=0).float()
    g = spec.validate(w.shape[1])
    grouped = w.reshape(-1, g).abs()
    grouped = grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)
    return grouped.reshape(w.shape).mean(0)


def grid_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    if w_mean is not None:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@torch.no_grad()
def search_scales(
    layer: DecoderLayer, group: ScaleGroup, cap: LayerCapture, spec: QuantSpec, cfg: AwqConfig,
    rotary: RotaryEmbedding,
) -> tuple[torch.Tensor, GroupResult]:
    """Grid search of the scale ratio for one group; the layer is restored before returning."""
    linears = [layer.get_submodule(n) for n in group.linears]
    originals = [lin.weight.data.clone() for lin in linears]
    x, target = cap.inputs[group.inspect], cap.targets[group.inspect]
    weights = cap.weights.get(group.inspect)
    if weights is not None:
        weights = weights.clone()
        weights[: cap.heavy.get(group.inspect, 0)] *= HEAVY_SEARCH_WEIGHT
    x_mean = cap.abs_mean[group.inspect].float()
    w_mean = weight_mean(originals, spec) if cfg.duo_scaling else None
    ratios = [i / cfg.n_grid for i in range(cfg.n_grid)]

    measure = None
    if group.lone and _gram_pays(x, linears[0], len(ratios)):
        gram, n = gram_of(x, weights)
        measure = linear_loss(linears[0], originals[0], gram, n)

    def loss_with(scales: torch.Tensor | None) -> float:
        for lin, w in zip(linears, originals):
            if scales is None:
                lin.weight.data = spec.fake(w)
            else:
                lin.weight.data = spec.fake(w * scales.view(1, -1)) / scales.view(1, -1)
        loss = measure() if measure is not None else chunked_loss(
            layer, group.inspect, x, target, rotary, cfg.chunk_tokens, weights)
        return loss if math.isfinite(loss) else math.inf

    try:
        loss_rtn = loss_with(None)
        best, best_ratio, best_scales, losses = math.inf, None, None, []
        for ratio in ratios:
            scales = grid_scales(x_mean, w_mean, ratio)
            loss = loss_with(scales)
            losses.append(loss)
            if loss < best:
                best, best_ratio, best_scales = loss, ratio, scales
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    fallback = best_scales is None
    if fallback:
        warnings.warn(
            f"AWQ: layer {layer.self_attn.layer_idx} group {group.name}: no finite loss in the scale search; "
            "this group is quantized without scaling",
            RuntimeWarning,
            stacklevel=2,
        )
        best_scales = torch.ones_like(x_mean)
        best = loss_rtn
    return best_scales, GroupResult(
        group.name, group.prev, list(group.linears), best_ratio, finite(loss_rtn), finite(best),
        [finite(v) for v in losses], fallback,
    )


@torch.no_grad()
def apply_scales(layer: DecoderLayer, group: ScaleGroup, scales: torch.Tensor, cap: LayerCapture | None = None) -> None:
    """Fold 1/s into the op before the group and s into the group's weight columns.

    Exact in fp arithmetic: prev(x)/s @ (W*s)^T == prev(x) @ W^T. The captured inputs of the
    group are divided too, so the clip search sees what the scaled weights will see.
    """
    s = scales.float()
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        prev.weight.data[-s.numel():].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data[-s.numel():].div_(s.to(prev.bias.dtype))
    else:  # RMSNorm: y = weight * normalised(x)
        prev.weight.data.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = layer.get_submodule(name)
        lin.weight.data.mul_(s.view(1, -1).to(lin.weight.dtype))
    if cap is not None:
        cap.inputs[group.inspect].div_(s)
