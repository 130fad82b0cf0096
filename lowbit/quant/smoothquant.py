"""SmoothQuant W8A8 of one decoder layer (Xiao et al., ICML 2023).

Why: int8 per-token activations lose the small channels of a token whose few outlier channels set
its scale. Smoothing divides each input channel j by s_j = max|X_j|^a / max|W_j|^(1-a) and
multiplies W's column j by it, exact in fp arithmetic, so the activation outliers shrink and the
weights (int8 per output channel, which has room to spare) take part of them. s is folded into the
op before the linears, as AWQ folds its scales (awq_scale.apply_scales), over AWQ's scale groups:
input_layernorm -> q, k, v; v -> o where shapes allow; post_attention_layernorm -> gate, up;
up -> down.

The migration strength a is searched per layer on a grid, scoring the output of the whole layer
run with fake W8A8 linears (FakeW8A8: exactly the kernel's rounding, in torch) against the fp
layer, on the calibration's search sequences; "no smoothing" is a candidate too. The per-channel
max |x| comes from one capture pass over every calibration token (capture.ActivationCapture with
a ChannelAbsMax statistic, next to AWQ's ChannelAbsMean).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QuantizationError
from ..kernels import ref
from ..layers.qweight import QuantizedWeight
from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from .activations import ActivationStore, chunk_sequences, run_layer
from .awq_config import AwqConfig, ScaleGroup, finite, scale_groups
from .awq_scale import SqErr, apply_scales
from .capture import ActivationCapture, Batch
from .primitives import quantize_weight
from .rtn import linear_names

#: Migration strengths tried per layer (None: no smoothing).
ALPHA_GRID: tuple[float | None, ...] = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SCALE = 1e-5


@dataclass
class SmoothResult:
    """One layer's search: the chosen alpha (None: no smoothing) and the layer-output MSE of each."""

    index: int
    alpha: float | None
    err_none: float  # W8A8 without smoothing
    err_best: float  # W8A8 with the chosen alpha
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class ChannelAbsMax:
    """Max |x| per input channel over every calibration token (a capture.Statistic)."""

    def __init__(self) -> None:
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor, out: torch.Tensor, batch: Batch) -> None:
        m = x.reshape(-1, x.shape[-1]).float().abs().amax(0)
        self.max = m if self.max is None else torch.maximum(self.max, m)


def fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels round it (per token, symmetric int8), in x's dtype."""
    q, s = ref.quantize_per_token(x)
    return (q.float() * s.unsqueeze(-1)).to(x.dtype)


class FakeW8A8(nn.Module):
    """A linear computing exactly what the W8A8 kernel computes, in dense torch: int8 per-channel
    weights (dequantized) times int8 per-token activations. The search scores this, and the tests
    use it as the dense reference of the engine's W8A8 path."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scale = int8_weight(weight)
        self.weight = nn.Parameter(q.float() * scale.unsqueeze(1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fake_int8_per_token(x), self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scale [N]) of the checkpoint's quantizer (symmetric per channel, 127 levels)."""
    qw = w8a8_weight(w)
    return (qw.q.to(torch.int16) - 128).to(torch.int8), qw.scales.reshape(-1)


def w8a8_weight(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """The canonical form of a W8A8 weight: 8-bit, symmetric, per output channel (zeros 128);
    scale_dtype: the scales rounded as the checkpoint stores them, before the codes are chosen."""
    return quantize_weight(w, 8, -1, sym=True, scale_dtype=scale_dtype)


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^a / max|W_j|^(1-a), max over every linear of the group and its output rows."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float().clamp(min=MIN_SCALE)
    s = x_max.float().clamp(min=MIN_SCALE).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=MIN_SCALE)


def _swap_fake(layer: DecoderLayer) -> dict[str, nn.Module]:
    """Replace each nn.Linear by its FakeW8A8; returns the originals to restore."""
    originals = {}
    for name in linear_names(layer):
        lin = layer.get_submodule(name)
        originals[name] = lin
        parent, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(parent), leaf, FakeW8A8(lin.weight, lin.bias))
    return originals


def _restore(layer: DecoderLayer, originals: dict[str, nn.Module]) -> None:
    for name, lin in originals.items():
        parent, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(parent), leaf, lin)


@torch.no_grad()
def _error(layer: DecoderLayer, h: torch.Tensor, y: torch.Tensor, rotary: RotaryEmbedding, chunk_seq: int,
           relative: bool = True) -> float:
    """Layer-output MSE against the fp output y with every linear run as FakeW8A8; relative: each
    token's error divided by the mean square of its layer input (AwqConfig.relative_loss: the next
    RMSNorm divides it by that, and the attention sinks' huge residuals stop steering the pick)."""
    originals = _swap_fake(layer)
    try:
        err = SqErr()
        for i in range(0, h.shape[0], chunk_seq):
            hc = h[i : i + chunk_seq]
            w = 1.0 / hc.pow(2).mean(-1).clamp(min=1e-12) if relative else None
            err.add(run_layer(layer, hc, rotary), y[i : i + chunk_seq], w)
        return finite(err.mean)
    finally:
        _restore(layer, originals)


def _smooth(layer: DecoderLayer, groups: list[ScaleGroup], x_max: dict[str, torch.Tensor], alpha: float) -> None:
    for g in groups:
        weights = [layer.get_submodule(n).weight for n in g.linears]
        apply_scales(layer, g, smoothing_scales(x_max[g.inspect], weights, alpha))


@torch.no_grad()
def smoothquant_layer(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, cfg: AwqConfig, index: int = 0,
    grid: tuple[float | None, ...] = ALPHA_GRID, scale_dtype: torch.dtype | None = None,
) -> tuple[dict[str, QuantizedWeight], SmoothResult]:
    """Search alpha for one layer, fold the chosen smoothing in and quantize its linears to W8A8.

    On return the layer's linears are FakeW8A8 modules (int8 weights, int8 activations), so the
    calibration activations carried to the next layer (`propagate`) see this layer's real error.
    """
    t0 = time.perf_counter()
    groups = scale_groups(layer)
    # each group's linears read the input of its `inspect` module (the attention, the MLP, a lone linear)
    stats = {g.inspect: [ChannelAbsMax()] for g in groups}
    n_search = store.n_sequences if cfg.search_samples is None else min(cfg.search_samples, store.n_sequences)
    searched = ActivationCapture(layer, rotary, stats).run(store, max(1, n_search))
    if searched is None:
        raise QuantizationError("SmoothQuant scores alpha on at least one whole calibration sequence")
    h, y = searched
    x_max = {name: s[0].max for name, s in stats.items()}
    chunk_seq = chunk_sequences(h.shape[1], cfg.chunk_tokens)
    fp_state = {k: v.clone() for k, v in layer.state_dict().items()}

    losses: dict[str, float] = {}
    for alpha in grid:
        layer.load_state_dict(fp_state)
        if alpha is not None:
            _smooth(layer, groups, x_max, alpha)
        losses["none" if alpha is None else f"{alpha:g}"] = _error(layer, h, y, rotary, chunk_seq, cfg.relative_loss)
    valid = {k: v for k, v in losses.items() if v >= 0}
    best = min(valid, key=valid.get) if valid else "none"
    alpha = None if best == "none" else float(best)
    layer.load_state_dict(fp_state)
    if alpha is not None:
        _smooth(layer, groups, x_max, alpha)
    qweights = {name: w8a8_weight(layer.get_submodule(name).weight, scale_dtype) for name in linear_names(layer)}
    _swap_fake(layer)  # the quantized layer carries the activations on
    result = SmoothResult(index, alpha, losses.get("none", -1.0), losses.get(best, -1.0), losses,
                          time.perf_counter() - t0)
    return qweights, result
