"""GPTQ and AWQ+GPTQ of one decoder layer, inside quantize()'s layer-by-layer pipeline.

Calibration inputs: the layer gets the hidden states the previous layers produced *after* they
were quantized (the pipeline's ActivationStore), as GPTQ does and as lowbit's AWQ does. Within
the layer, gptq_sequential rounds sub-block after sub-block in one quantized pass, each Hessian
taken from the already-rounded part of the layer; that pass also yields the next layer's inputs
(GptqLayerOutput.next_store), so the pipeline does not propagate again.

  gptq:      the staged pass on the source weights.
  awq-gptq:  AWQ's capture pass, scale search and folding as in awq_quantize_layer, then,
             optionally, its clip search; then the staged pass on the scaled weights, whose
             Hessians are those of the scaled inputs, and GPTQ rounds the (clamped) weights onto
             grids that keep AWQ's clip thresholds (llm-compressor's AWQ + GPTQ recipe, plus the
             clip llm-compressor's AWQ does not search).

The report: each layer's output error on the search sequences for RTN and the method run; an
awq-gptq layer also reports AWQ (its scales and clips, RTN rounding) and, with compare, GPTQ
alone (a staged pass on a copy of the unscaled layer), so one run shows all four methods.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import QuantizationError
from ..layers.qweight import QuantizedWeight
from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from .activations import ActivationStore, chunk_sequences, run_layer
from .awq import capture, layer_output_error, rtn_layer_error
from .awq_clip import clamp_groups, clip_layer
from .awq_config import AwqConfig, ClipResult, GroupResult, LayerCapture, finite, scale_groups
from .awq_scale import apply_scales, search_scales
from .gptq import GptqConfig, GptqResult
from .gptq_sequential import SequentialOutput, gptq_sequential
from .method_report import errors_png
from .rtn import QuantSpec, linear_names

GPTQ_METHODS = ("gptq", "awq-gptq")

# ----------------------------------------------------------------------------- results


@dataclass
class LinearStats:
    name: str
    err_rtn: float  # H-weighted output MSE of RTN of the weights GPTQ was given
    err_gptq: float
    damp: float
    damp_raised: bool  # the Cholesky needed more than the configured dampening


@dataclass
class GptqLayerResult:
    """Layer-output MSE vs fp on the search sequences; None where that method was not run."""

    index: int
    method: str
    err_rtn: float
    err_gptq: float | None = None  # GPTQ on the source weights
    err_awq: float | None = None  # AWQ scales (+ clip) and RTN rounding
    err_awq_gptq: float | None = None
    seconds: float = 0.0
    linears: list[LinearStats] = field(default_factory=list)
    groups: list[GroupResult] = field(default_factory=list)
    clips: list[ClipResult] = field(default_factory=list)

    @property
    def err_method(self) -> float:
        return self.err_awq_gptq if self.method == "awq-gptq" else self.err_gptq


@dataclass
class GptqLayerOutput:
    qweights: dict[str, QuantizedWeight]  # group-contiguous; columns in perms[name] order when present
    perms: dict[str, torch.Tensor]  # act order "group": linear -> input-channel permutation
    result: GptqLayerResult
    next_store: ActivationStore  # the rounded layer's outputs on every calibration sequence


# ----------------------------------------------------------------------------- helpers


def _weights(layer: DecoderLayer) -> dict[str, torch.Tensor]:
    return {n: layer.get_submodule(n).weight.data.clone() for n in linear_names(layer)}


def _restore(layer: DecoderLayer, weights: dict[str, torch.Tensor]) -> None:
    for n, w in weights.items():
        layer.get_submodule(n).weight.data = w.clone()


def _output(seq: SequentialOutput, res: GptqLayerResult, names: list[str]) -> GptqLayerOutput:
    results = {n: seq.results[n] for n in names}
    res.linears = [LinearStats(n, finite(r.err_rtn), finite(r.err), r.damp, r.damp_raised)  # JSON-safe
                   for n, r in results.items()]
    perms = {n: r.perm for n, r in results.items() if r.perm is not None}
    return GptqLayerOutput({n: r.qweight for n, r in results.items()}, perms, res, seq.next_store)


def _search_capture(layer, rotary, store: ActivationStore, n_search: int, chunk_seq: int) -> LayerCapture:
    """The fp layer's inputs and outputs on the first n_search sequences (the error report's)."""
    if n_search < 1:
        raise QuantizationError("GPTQ reports its error on at least one whole calibration sequence (search_samples >= 1)")
    hs, seen = [], 0
    for h in store:
        hs.append(h[: n_search - seen])
        seen += hs[-1].shape[0]
        if seen >= n_search:
            break
    h = torch.cat(hs)
    y = torch.cat([run_layer(layer, h[i : i + chunk_seq], rotary) for i in range(0, h.shape[0], chunk_seq)])
    return LayerCapture(h=h, y=y, inputs={}, targets={}, abs_mean={})


def _setup(store: ActivationStore, cfg: AwqConfig) -> tuple[int, int]:
    seqlen = next(iter(store)).shape[1]
    n_search = store.n_sequences if cfg.search_samples is None else min(cfg.search_samples, store.n_sequences)
    return chunk_sequences(seqlen, cfg.chunk_tokens), n_search


# ----------------------------------------------------------------------------- one layer


@torch.no_grad()
def gptq_quantize_layer(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, spec: QuantSpec,
    gcfg: GptqConfig, acfg: AwqConfig, index: int = 0,
) -> GptqLayerOutput:
    """GPTQ of every linear of the layer. On return the layer's weights hold their dequantized
    values (original channel order)."""
    t0 = time.perf_counter()
    chunk_seq, n_search = _setup(store, acfg)
    cap = _search_capture(layer, rotary, store, n_search, chunk_seq)
    err_rtn = rtn_layer_error(layer, cap, spec, rotary, chunk_seq)
    seq = gptq_sequential(layer, rotary, store, spec, gcfg)
    err = layer_output_error(layer, cap, rotary, chunk_seq)
    res = GptqLayerResult(index, "gptq", err_rtn, err_gptq=err, seconds=time.perf_counter() - t0)
    return _output(seq, res, linear_names(layer))


@torch.no_grad()
def awq_gptq_quantize_layer(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, spec: QuantSpec,
    gcfg: GptqConfig, acfg: AwqConfig, index: int = 0, compare: bool = True,
) -> GptqLayerOutput:
    """AWQ's scale search and folding (and clip search when acfg.clip), then GPTQ on the scaled
    weights, the staged pass giving the scaled inputs' Hessians. compare: also measure GPTQ alone
    (a staged pass on a copy of the unscaled layer) and AWQ alone on this layer for the report;
    the result is unchanged."""
    t0 = time.perf_counter()
    chunk_seq, n_search = _setup(store, acfg)
    groups = scale_groups(layer)
    cap = capture(layer, rotary, store, n_search, acfg.search_tokens, acfg.heavy_tokens, acfg.relative_loss)
    err_rtn = rtn_layer_error(layer, cap, spec, rotary, chunk_seq)
    res = GptqLayerResult(index, "awq-gptq", err_rtn)
    if compare:
        alone = copy.deepcopy(layer)
        gptq_sequential(alone, rotary, store, spec, gcfg)
        res.err_gptq = layer_output_error(alone, cap, rotary, chunk_seq)
        del alone

    found = [search_scales(layer, g, cap, spec, acfg, rotary) for g in groups]
    for g, (scales, _) in zip(groups, found):
        apply_scales(layer, g, scales, cap)
    res.groups = [r for _, r in found]
    thresholds, res.clips = clip_layer(layer, cap, spec, acfg) if acfg.clip else ({}, [])
    if compare:
        scaled = _weights(layer)
        for n, w in scaled.items():
            rtn = spec.quantize(clamp_groups(w, thresholds[n]) if n in thresholds else w)
            layer.get_submodule(n).weight.data = rtn.dequantize(torch.float32).to(w.dtype)
        res.err_awq = layer_output_error(layer, cap, rotary, chunk_seq)
        _restore(layer, scaled)

    seq = gptq_sequential(layer, rotary, store, spec, gcfg, thresholds)
    res.err_awq_gptq = layer_output_error(layer, cap, rotary, chunk_seq)
    res.seconds = time.perf_counter() - t0
    return _output(seq, res, linear_names(layer))


def quantize_layer(method: str, *args, **kwargs) -> GptqLayerOutput:
    if method == "gptq":
        return gptq_quantize_layer(*args, **kwargs)
    if method == "awq-gptq":
        return awq_gptq_quantize_layer(*args, **kwargs)
    raise ValueError(f"not a GPTQ method: {method!r}")


# ----------------------------------------------------------------------------- report


def totals(layers: list[GptqLayerResult]) -> dict:
    """Sums of the per-layer errors of every method measured, and how often the method run beat RTN."""
    if not layers:
        return {}
    out: dict = {}
    for key in ("err_rtn", "err_gptq", "err_awq", "err_awq_gptq"):
        vals = [getattr(r, key) for r in layers if getattr(r, key) is not None]
        if vals:
            out["layer_error_" + key[4:] + "_sum"] = float(sum(max(0.0, v) for v in vals))
    out["layers_better_than_rtn"] = sum(1 for r in layers if r.err_method is not None and 0 <= r.err_method <= r.err_rtn)
    out["damp_raised"] = [f"{r.index}:{s.name}" for r in layers for s in r.linears if s.damp_raised]
    return out


def check_request(cfg: GptqConfig, fmt: str) -> None:
    """GPTQ's part of pipeline.check_request: refused before any weight is read."""
    cfg.validate()
    if cfg.act_order == "group" and fmt != "compressed-tensors":
        raise QuantizationError(
            "act order 'group' needs a g_idx, which only the compressed-tensors format stores; "
            "use --format compressed-tensors, or --act-order weight (no g_idx, any format)"
        )


def report_png(layers: list[GptqLayerResult], title: str) -> bytes:
    return errors_png([r.index for r in layers], error_series(layers), title)


def error_series(layers: list[GptqLayerResult]) -> dict[str, list[float]]:
    """label -> per-layer error, for every method measured on every layer (the report plot)."""
    labels = {"err_rtn": "RTN", "err_awq": "AWQ", "err_gptq": "GPTQ", "err_awq_gptq": "AWQ-GPTQ"}
    return {label: [getattr(r, key) for r in layers] for key, label in labels.items()
            if layers and all(getattr(r, key) is not None for r in layers)}


def layer_dict(r: GptqLayerResult) -> dict:
    d = asdict(r)
    d["seconds"] = round(d["seconds"], 3)
    return d


