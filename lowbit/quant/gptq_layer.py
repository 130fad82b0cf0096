"""GPTQ and AWQ+GPTQ of one decoder layer, inside quantize()'s layer-by-layer pipeline.

Calibration inputs: the layer gets the hidden states the previous layers produced *after* they
were quantized (the pipeline's ActivationStore, carried by activations.propagate through the
dequantized layer), as GPTQ does and as lowbit's AWQ does. Within a layer, "true sequential"
(GptqConfig.true_sequential, the default, as AutoGPTQ): the linears are rounded sub-block by
sub-block in data-flow order (q/k/v, o, gate/up, down) and each later sub-block's Hessian is
collected again, by one more pass over the calibration tokens, with the earlier ones already
rounded. Why: a Hessian taken from the fp layer describes inputs the quantized layer never
produces, and GPTQ's corrections are fitted to exactly those inputs. Measured on the default
model (W4 g64): with every Hessian from one fp pass, GPTQ's layer-output error was *above*
RTN's on 8 of 30 layers (layer 18: 1.19 against 0.34) although every single linear beat RTN on
its own Hessian. The extra passes are cheap next to GPTQ's column loop.

Hessians: gptq_hessian.HessianCapture's hooks, accumulated while the layer runs: one per
distinct linear input, and for v_proj one attention-weighted Hessian per kv head.

  gptq:      H from a plain fp pass; GPTQ on the source weights.
  awq-gptq:  the hooks ride along AWQ's own capture pass (awq.capture). AWQ's scale search and
             folding run as in awq_quantize_layer, then, optionally, its clip search; the
             inputs of a scaled group are divided by s, so each Hessian becomes
             diag(1/s) H diag(1/s) exactly, and GPTQ rounds the scaled (clamped) weights onto
             grids that keep AWQ's clip thresholds (llm-compressor's AWQ + GPTQ recipe, plus
             the clip llm-compressor's AWQ does not search).

The report: each layer's output error on the search sequences for RTN and the method run; an
awq-gptq layer also reports AWQ (its scales and clips, RTN rounding) and GPTQ alone (the
unscaled weights), so one run shows all four methods side by side.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..errors import QuantizationError
from ..layers.qweight import QuantizedWeight
from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from .activations import ActivationStore, chunk_sequences
from .awq import capture, layer_output_error, rtn_layer_error
from .awq_clip import clamp_groups, clip_layer
from .awq_config import AwqConfig, ClipResult, GroupResult, LayerCapture, finite, scale_groups
from .awq_scale import apply_scales, search_scales
from .capture import ActivationCapture
from .gptq import GptqConfig, GptqResult, gptq_quantize_heads, gptq_quantize_shared
from .gptq_hessian import HessianCapture, hessian_source
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


# ----------------------------------------------------------------------------- helpers


def load_gptq_(layer: DecoderLayer, results: dict[str, GptqResult]) -> None:
    """Each Linear's weight := its GPTQ result dequantized, in the original channel order."""
    for name, r in results.items():
        lin = layer.get_submodule(name)
        lin.weight.data = r.dequantize().to(lin.weight.dtype)


def _weights(layer: DecoderLayer) -> dict[str, torch.Tensor]:
    return {n: layer.get_submodule(n).weight.data.clone() for n in linear_names(layer)}


def _restore(layer: DecoderLayer, weights: dict[str, torch.Tensor]) -> None:
    for n, w in weights.items():
        layer.get_submodule(n).weight.data = w.clone()


def _gptq_all(layer: DecoderLayer, hc: HessianCapture, spec: QuantSpec, cfg: GptqConfig,
              thresholds: dict[str, torch.Tensor] | None = None,
              recapture: Callable[[str], torch.Tensor] | None = None) -> dict[str, GptqResult]:
    """GPTQ of every linear, sub-block by sub-block in data-flow order, each result loaded into
    the layer as soon as it is found. Linears that share an input (one Hessian) are rounded in
    one stacked pass (gptq_quantize_shared), which gives each the result it would get alone.

    recapture(source) -> the Hessian of that input, collected again from the layer as it is now
    (true sequential); None: every Hessian comes from hc, the pass over the unrounded layer."""
    thresholds = thresholds or {}
    by_source: dict[str, list[str]] = {}
    for n in linear_names(layer):
        by_source.setdefault(hessian_source(n), []).append(n)
    results: dict[str, GptqResult] = {}
    for k, (src, names) in enumerate(by_source.items()):
        h = recapture(src) if recapture is not None and k > 0 else hc.hessian(names[0])
        if isinstance(h, list):  # v_proj: one Hessian per kv head
            order = hc.act_order(names[0]) if cfg.act_order is not None else None
            found = {names[0]: gptq_quantize_heads(layer.get_submodule(names[0]).weight.data, h, spec, cfg,
                                                   thresholds.get(names[0]), order)}
        else:
            found = dict(zip(names, gptq_quantize_shared([layer.get_submodule(n).weight.data for n in names], h,
                                                         spec, cfg, [thresholds.get(n) for n in names])))
        load_gptq_(layer, found)
        results.update(found)
    return {n: results[n] for n in linear_names(layer)}


def _recapture(layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, cfg: GptqConfig):
    """The true-sequential Hessian source for _gptq_all (None when the config turns it off)."""
    if not cfg.true_sequential:
        return None

    def hessian(src: str) -> torch.Tensor:
        with HessianCapture(layer, [src]) as hc:
            ActivationCapture(layer, rotary, {}).run(store)
        return hc.hessian(src)

    return hessian


def _output(results: dict[str, GptqResult], res: GptqLayerResult) -> GptqLayerOutput:
    res.linears = [LinearStats(n, finite(r.err_rtn), finite(r.err), r.damp, r.damp_raised)  # JSON-safe
                   for n, r in results.items()]
    perms = {n: r.perm for n, r in results.items() if r.perm is not None}
    return GptqLayerOutput({n: r.qweight for n, r in results.items()}, perms, res)


def _search_capture(layer, rotary, store: ActivationStore, n_search: int) -> LayerCapture:
    """One fp pass over every chunk (the Hessian hooks see all tokens); keeps the first n_search
    sequences' inputs and outputs for the error report."""
    searched = ActivationCapture(layer, rotary, {}).run(store, n_search)
    if searched is None:
        raise QuantizationError("GPTQ reports its error on at least one whole calibration sequence (search_samples >= 1)")
    h, y = searched
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
    values (original channel order), ready for awq.propagate."""
    t0 = time.perf_counter()
    chunk_seq, n_search = _setup(store, acfg)
    with HessianCapture(layer) as hc:
        cap = _search_capture(layer, rotary, store, n_search)
    err_rtn = rtn_layer_error(layer, cap, spec, rotary, chunk_seq)
    results = _gptq_all(layer, hc, spec, gcfg, recapture=_recapture(layer, rotary, store, gcfg))
    err = layer_output_error(layer, cap, rotary, chunk_seq)
    res = GptqLayerResult(index, "gptq", err_rtn, err_gptq=err, seconds=time.perf_counter() - t0)
    return _output(results, res)


@torch.no_grad()
def awq_gptq_quantize_layer(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, spec: QuantSpec,
    gcfg: GptqConfig, acfg: AwqConfig, index: int = 0, compare: bool = True,
) -> GptqLayerOutput:
    """AWQ's scale search and folding (and clip search when acfg.clip), then GPTQ on the scaled
    weights with the correspondingly scaled Hessians. compare: also measure GPTQ alone and AWQ
    alone on this layer for the report (one more GPTQ pass; the result is unchanged)."""
    t0 = time.perf_counter()
    chunk_seq, n_search = _setup(store, acfg)
    groups = scale_groups(layer)
    with HessianCapture(layer) as hc:  # its hooks ride along AWQ's own capture pass
        cap = capture(layer, rotary, store, n_search, acfg.search_tokens, acfg.heavy_tokens, acfg.relative_loss)
    err_rtn = rtn_layer_error(layer, cap, spec, rotary, chunk_seq)
    res = GptqLayerResult(index, "awq-gptq", err_rtn)
    if compare:
        source = _weights(layer)
        _gptq_all(layer, hc, spec, gcfg, recapture=_recapture(layer, rotary, store, gcfg))
        res.err_gptq = layer_output_error(layer, cap, rotary, chunk_seq)
        _restore(layer, source)

    found = [search_scales(layer, g, cap, spec, acfg, rotary) for g in groups]
    for g, (scales, _) in zip(groups, found):
        apply_scales(layer, g, scales, cap)
        hc.scale_inputs(g.linears, scales)
    res.groups = [r for _, r in found]
    thresholds, res.clips = clip_layer(layer, cap, spec, acfg) if acfg.clip else ({}, [])
    if compare:
        scaled = _weights(layer)
        for n, w in scaled.items():
            rtn = spec.quantize(clamp_groups(w, thresholds[n]) if n in thresholds else w)
            layer.get_submodule(n).weight.data = rtn.dequantize(torch.float32).to(w.dtype)
        res.err_awq = layer_output_error(layer, cap, rotary, chunk_seq)
        _restore(layer, scaled)

    results = _gptq_all(layer, hc, spec, gcfg, thresholds, _recapture(layer, rotary, store, gcfg))
    res.err_awq_gptq = layer_output_error(layer, cap, rotary, chunk_seq)
    res.seconds = time.perf_counter() - t0
    return _output(results, res)


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


