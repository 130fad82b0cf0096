"""quantize(): model in, quantized checkpoint out, one decoder layer at a time.

Why layer by layer: only one layer's fp32 weights, the calibration activations and the
quantized results are ever in memory. Weights are read per layer through the lazy safetensors
reader (models.weights: each file is opened only while its tensors are read, so its pages leave
the process again), the calibration tokens' embedding rows are read in blocks, and finished
layers are spilled to a scratch folder until the checkpoint writer packs them. A model larger than RAM can therefore be
quantized; the checkpoint writer itself still holds the packed output (see the report).
Freed memory is handed back after each layer (malloc_trim); keeping big tensors out of the heap
in the first place needs glibc's mmap threshold pinned, a process-wide setting that cannot be
undone, so the entry point that owns the process does it (`lowbit quantize`; see quant/heap.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import LowbitError, ModelLoadError, QuantizationError
from ..fsio import check_target
from ..models.config import ModelConfig
from ..models.loader import load_tokenizer, read_hf_config, resolve_model_dir
from ..models.registry import resolve_config
from ..models.transformer import DecoderLayer, rotary_for
from ..models.weights import SafetensorsCheckpoint, read_file
from .activations import ActivationStore, propagate
from .awq import awq_quantize_layer
from .awq_config import AwqConfig, LayerResult
from .calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQLEN,
    CalibrationData,
    build_calibration,
    calibration_from_ids,
)
from ..layers.qweight import QuantizedWeight
from . import gptq_layer
from .checkpoint import FORMATS, save_quantized, storage_scale_dtype
from .gptq import GptqConfig
from .gptq_layer import GPTQ_METHODS
from .heap import release_freed_memory
from .method_report import errors_png
from .rtn import MODULES_NOT_CONVERTED, QuantSpec, rtn_quantize_layer
from .smoothquant import smoothquant_layer

SMOOTHQUANT = "smoothquant"  # W8A8: int8 per-channel weights, int8 per-token activations
METHODS = ("awq", "rtn", SMOOTHQUANT, *GPTQ_METHODS)
CALIBRATED = ("awq", SMOOTHQUANT, *GPTQ_METHODS)
REPORT_JSON = "quant_report.json"
REPORT_PNG = "quant_report.png"
EMBED = "model.embed_tokens.weight"
EMBED_BLOCK_ROWS = 4096


# ----------------------------------------------------------------------------- reading lazily


def embedding_rows(ckpt: SafetensorsCheckpoint, token_ids: torch.Tensor) -> torch.Tensor:
    """Embedding vectors of token_ids (any shape) as float32, read in row blocks."""
    if EMBED not in ckpt:
        raise ModelLoadError(f"{ckpt.folder}: checkpoint has no {EMBED}")
    flat = token_ids.reshape(-1)
    with ckpt.slice(EMBED) as sl:
        vocab, hidden = sl.get_shape()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
            raise QuantizationError(f"calibration token ids must lie in [0, {vocab}); got {int(flat.max())}")
        out = torch.empty(flat.numel(), hidden, dtype=torch.float32)
        for start in range(0, vocab, EMBED_BLOCK_ROWS):
            sel = ((flat >= start) & (flat < start + EMBED_BLOCK_ROWS)).nonzero().squeeze(1)
            if sel.numel():
                block = sl[start : start + EMBED_BLOCK_ROWS]
                out[sel] = block[flat[sel] - start].float()
    return out.reshape(*token_ids.shape, hidden)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def build_layer(cfg: ModelConfig, ckpt: SafetensorsCheckpoint, i: int) -> DecoderLayer:
    """One fp32 DecoderLayer from the checkpoint (built on the meta device, weights assigned)."""
    prefix = layer_prefix(i)
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i)
    expected = list(layer.state_dict())
    tensors = ckpt.read([prefix + k for k in expected])
    state = {k[len(prefix):]: t.to(torch.float32) for k, t in tensors.items()}
    for k, t in state.items():
        want = tuple(layer.get_parameter(k).shape)
        if tuple(t.shape) != want:
            raise ModelLoadError(f"tensor {prefix + k} has shape {tuple(t.shape)}, config implies {want}")
    layer.load_state_dict(state, strict=True, assign=True)
    layer.requires_grad_(False)
    return layer.eval()


# ----------------------------------------------------------------------------- scratch output


class SpilledWeights(Mapping):
    """name -> QuantizedWeight, kept on disk in a scratch folder (one file per layer) and
    materialised on access, so finished layers do not accumulate in RAM."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, tuple[Path, int, int, bool]] = {}
        folder.mkdir(parents=True)

    def add_layer(self, index: int, weights: dict[str, QuantizedWeight]) -> None:
        path = self.folder / f"layer-{index:05d}.safetensors"
        tensors = {}
        for name, qw in weights.items():
            tensors[f"{name}.q"] = qw.q.contiguous()
            tensors[f"{name}.scales"] = qw.scales.contiguous()
            tensors[f"{name}.zeros"] = qw.zeros.contiguous()
        save_file(tensors, str(path))
        for name, qw in weights.items():
            self.where[name] = (path, qw.bits, qw.group_size, qw.sym)

    def __getitem__(self, name: str) -> QuantizedWeight:
        path, bits, group_size, sym = self.where[name]
        t = read_file(path, [f"{name}.{k}" for k in ("q", "scales", "zeros")])
        return QuantizedWeight(q=t[f"{name}.q"], scales=t[f"{name}.scales"], zeros=t[f"{name}.zeros"],
                               bits=bits, group_size=group_size, sym=sym)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class FpTensors(Mapping):
    """Every checkpoint tensor that is not a quantized weight: changed ones (AWQ-folded norms and
    biases) from memory, the rest (embeddings, final norm, lm_head) read from the source on access."""

    def __init__(self, ckpt: SafetensorsCheckpoint, quantized_weights: set[str], overrides: dict[str, torch.Tensor]) -> None:
        self.ckpt = ckpt
        self.names = [n for n in ckpt.keys() if n not in quantized_weights]
        self._known = set(self.names)
        self.overrides = overrides

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        if name in self.overrides:
            return self.overrides[name]
        return self.ckpt.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._known


# ----------------------------------------------------------------------------- report


@dataclass
class QuantizeReport:
    """What quantize() did; written to quant_report.json next to the checkpoint."""

    model: str
    out_dir: str
    method: str
    fmt: str
    bits: int
    group_size: int
    sym: bool
    num_layers: int
    quantized_linears: int
    modules_to_not_convert: list[str]
    calibration: dict[str, Any] | None = None
    awq: dict[str, Any] | None = None
    gptq: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    quantize_seconds: float = 0.0
    save_seconds: float = 0.0
    total_seconds: float = 0.0
    totals: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False) + "\n"


def _layer_dict(r: LayerResult) -> dict[str, Any]:
    d = asdict(r)
    d["seconds"] = round(d["seconds"], 3)
    return d


def _totals(layers: list[LayerResult]) -> dict[str, Any]:
    if not layers:
        return {}
    rtn = [r.err_rtn for r in layers]
    awq = [r.err_awq for r in layers]
    fallbacks = [f"{r.index}:{g.name}" for r in layers for g in r.groups if g.fallback]
    better = sum(1 for a, b in zip(awq, rtn) if 0 <= a <= b)
    return {
        "layer_error_rtn_sum": float(sum(max(0.0, v) for v in rtn)),
        "layer_error_awq_sum": float(sum(max(0.0, v) for v in awq)),
        "layers_awq_better_than_rtn": better,
        "scale_fallbacks": fallbacks,
        "mean_ratio": {
            name: float(sum(g.ratio for r in layers for g in r.groups if g.name == name and g.ratio is not None)
                        / max(1, sum(1 for r in layers for g in r.groups if g.name == name and g.ratio is not None)))
            for name in sorted({g.name for r in layers for g in r.groups})
        },
    }


def _smooth_totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """SmoothQuant: the summed layer-output errors with and without smoothing, and the alphas chosen."""
    return {
        "layer_error_w8a8_sum": float(sum(max(0.0, r["err_none"]) for r in layers)),
        "layer_error_smoothquant_sum": float(sum(max(0.0, r["err_best"]) for r in layers)),
        "alphas": [r["alpha"] for r in layers],
    }


def report_png(layers: list[LayerResult], title: str) -> bytes:
    """Per-layer output error of RTN vs AWQ on the same inputs (log scale)."""
    series = {"RTN": [r.err_rtn for r in layers], "AWQ": [r.err_awq for r in layers]}
    return errors_png([r.index for r in layers], series, title)


# ----------------------------------------------------------------------------- checks


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each decoder linear -> (in_features, out_features)."""
    return {
        "self_attn.q_proj": (cfg.hidden_size, cfg.q_size),
        "self_attn.k_proj": (cfg.hidden_size, cfg.kv_size),
        "self_attn.v_proj": (cfg.hidden_size, cfg.kv_size),
        "self_attn.o_proj": (cfg.q_size, cfg.hidden_size),
        "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }


AUTO_GROUP_SIZES = (128, 64, 32)


def auto_group_size(cfg: ModelConfig) -> int:
    """The usual AWQ group size, 128, where it divides every linear's input features; otherwise the
    largest of 64 and 32 that does (SmolLM2-135M's hidden size 576 takes 64), else per-channel."""
    ins = {fin for fin, _ in linear_shapes(cfg).values()}
    return next((g for g in AUTO_GROUP_SIZES if all(i % g == 0 for i in ins)), -1)


def check_request(cfg: ModelConfig, method: str, spec: QuantSpec, fmt: str, gptq_cfg: GptqConfig | None = None) -> None:
    """Everything that can be refused is refused here, before any weight is read."""
    if method not in METHODS:
        raise QuantizationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if method in GPTQ_METHODS:
        gptq_layer.check_request(gptq_cfg or GptqConfig(), fmt)
    if method == SMOOTHQUANT and (spec.bits != 8 or not spec.sym or not spec.per_channel or fmt != "compressed-tensors"):
        raise QuantizationError(
            "smoothquant writes W8A8: 8-bit symmetric per-channel weights in the compressed-tensors format "
            f"(got {spec.bits} bits, group size {spec.group_size}, sym {spec.sym}, format {fmt})"
        )
    if fmt == "awq" and spec.bits != 4:
        raise QuantizationError(
            f"the awq checkpoint format stores 4-bit weights only; use --format compressed-tensors for {spec.bits} bits"
        )
    for name, (fin, fout) in linear_shapes(cfg).items():
        spec.validate(fin, name)
        if fmt == "awq" and fout % 8:
            raise QuantizationError(f"{name}: the awq format needs out_features divisible by 8, got {fout}")


def check_out_dir(out_dir: Path, model_dir: Path, force: bool) -> None:
    check_target(out_dir, force, hint="pass --force to replace it")
    if out_dir.resolve() == model_dir.resolve():
        raise LowbitError(f"output folder {out_dir} is the source model's folder; choose another one")


# ----------------------------------------------------------------------------- main entry


def quantize(
    model_spec: str | os.PathLike | None = None,
    method: str = "awq",
    w_bit: int = 4,
    group_size: int | None = None,
    sym: bool = False,
    calib: str | os.PathLike | None = None,
    calib_samples: int = DEFAULT_SAMPLES,
    calib_seqlen: int = DEFAULT_SEQLEN,
    fmt: str = "awq",
    out_dir: str | os.PathLike = "quantized",
    force: bool = False,
    *,
    awq_config: AwqConfig | None = None,
    gptq_config: GptqConfig | None = None,
    calib_ids: torch.Tensor | None = None,
    progress: bool = True,
    seed: int = 0,
) -> QuantizeReport:
    """Quantize a model (AWQ, RTN, GPTQ or AWQ-GPTQ) and write a checkpoint in `fmt` to out_dir.

    group_size None picks auto_group_size(); -1 is per output channel.

    calib_ids: token ids to calibrate on instead of text (a stream or [n, seqlen] blocks), for
    models without a tokenizer. Returns the report also saved as out_dir/quant_report.json.
    """
    t_start = time.perf_counter()
    model_dir = resolve_model_dir(model_spec)
    hf = read_hf_config(model_dir)
    if hf.get("quantization_config"):
        raise QuantizationError(f"{model_dir} is already quantized; start from a full-precision model")
    cfg = resolve_config(hf)
    if group_size is None:
        group_size = -1 if method == SMOOTHQUANT else auto_group_size(cfg)
    out = Path(out_dir).expanduser().absolute()
    spec = QuantSpec(w_bit, group_size, sym, scale_dtype=storage_scale_dtype(fmt, hf) if fmt in FORMATS else None)
    gptq_cfg = gptq_config or GptqConfig()
    check_request(cfg, method, spec, fmt, gptq_cfg)
    check_out_dir(out, model_dir, force)
    awq_cfg = awq_config or AwqConfig()

    ckpt = SafetensorsCheckpoint(model_dir)
    calib_data: CalibrationData | None = None
    if method in CALIBRATED:
        if calib_ids is not None:
            calib_data = calibration_from_ids(calib_ids, calib_samples, calib_seqlen)
        else:
            calib_data = build_calibration(calib, load_tokenizer(model_dir), calib_samples, calib_seqlen, seed)

    report = QuantizeReport(
        model=str(model_dir), out_dir=str(out), method=method, fmt=fmt, bits=w_bit,
        group_size=group_size, sym=sym, num_layers=cfg.num_layers, quantized_linears=0,
        modules_to_not_convert=["model.embed_tokens", *MODULES_NOT_CONVERTED],
        calibration=None if calib_data is None else {
            "source": calib_data.source, "samples": calib_data.n_samples, "seqlen": calib_data.seqlen,
            "documents": calib_data.n_documents,
        },
        awq=asdict(awq_cfg) if method in ("awq", "awq-gptq", SMOOTHQUANT) else None,
        gptq=asdict(gptq_cfg) if method in GPTQ_METHODS else None,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    spill = SpilledWeights(out.parent / f".{out.name}.layers-{uuid.uuid4().hex[:8]}")
    try:
        perms: dict[str, torch.Tensor] = {}
        layer_results, overrides = _quantize_layers(
            cfg, ckpt, spec, method, awq_cfg, calib_data, spill, progress, report, gptq_cfg, perms)
        report.quantize_seconds = round(time.perf_counter() - t_start, 2)
        report.quantized_linears = len(spill)
        report.totals = ((gptq_layer.totals if method in GPTQ_METHODS else _totals)(layer_results)
                         if method != SMOOTHQUANT else _smooth_totals(report.layers))
        fp = FpTensors(ckpt, {f"{n}.weight" for n in spill}, overrides)
        extra = {REPORT_JSON: b""}
        if layer_results and method != SMOOTHQUANT:
            title = f"{cfg.architecture} W{w_bit} g{group_size}{' sym' if sym else ''}: per-layer output error"
            extra[REPORT_PNG] = (gptq_layer.report_png if method in GPTQ_METHODS else report_png)(layer_results, title)
        t_save = time.perf_counter()
        report.total_seconds = round(t_save - t_start, 2)  # updated below; the file records up to the save
        extra[REPORT_JSON] = report.to_json().encode()
        save_quantized(
            out, hf_config=hf, fp_tensors=fp, quantized=spill, fmt=fmt, copy_files_from=model_dir,
            force=force, extra_files=extra, scale_dtype=spec.scale_dtype, input_perms=perms,
            actorder_name="weight" if method in GPTQ_METHODS and gptq_cfg.act_order == "weight" else None,
            activations="int8" if method == SMOOTHQUANT else None,
        )
        report.save_seconds = round(time.perf_counter() - t_save, 2)
        report.total_seconds = round(time.perf_counter() - t_start, 2)
    finally:
        spill.cleanup()
    return report


def _quantize_layers(
    cfg: ModelConfig, ckpt: SafetensorsCheckpoint, spec: QuantSpec, method: str, awq_cfg: AwqConfig,
    calib: CalibrationData | None, spill: SpilledWeights, progress: bool, report: QuantizeReport,
    gptq_cfg: GptqConfig | None = None, perms: dict[str, torch.Tensor] | None = None,
) -> tuple[list, dict[str, torch.Tensor]]:
    """Quantize layer after layer into `spill`; returns AWQ's / GPTQ's per-layer results and the non-quantized
    layer tensors AWQ changed (folded norms and biases). GPTQ's act-order permutations go into `perms`."""
    rotary = rotary_for(cfg)
    store: ActivationStore | None = None
    if calib is not None:
        store = ActivationStore()
        chunk = max(1, awq_cfg.chunk_tokens // calib.seqlen)
        for i in range(0, calib.n_samples, chunk):
            store.append(embedding_rows(ckpt, calib.input_ids[i : i + chunk]))
    overrides: dict[str, torch.Tensor] = {}
    results: list[LayerResult] = []
    bar = tqdm(range(cfg.num_layers), desc=method.upper(), unit="layer", disable=not progress, dynamic_ncols=True)
    for i in bar:
        t0 = time.perf_counter()
        layer = build_layer(cfg, ckpt, i)
        prefix = layer_prefix(i)
        if method in CALIBRATED:
            assert store is not None
            next_store = None  # GPTQ's staged pass yields the next layer's inputs itself
            if method == "awq":
                qweights, res = awq_quantize_layer(layer, rotary, store, spec, awq_cfg, index=i)
            elif method == SMOOTHQUANT:
                qweights, res = smoothquant_layer(layer, rotary, store, awq_cfg, index=i, scale_dtype=spec.scale_dtype)
            else:
                step = gptq_layer.quantize_layer(method, layer, rotary, store, spec, gptq_cfg or GptqConfig(), awq_cfg, index=i)
                qweights, res, next_store = step.qweights, step.result, step.next_store
                if perms is not None:
                    perms.update({prefix + n: p for n, p in step.perms.items()})
            results.append(res)
            if i + 1 == cfg.num_layers:
                store = None
            else:
                store = next_store if next_store is not None else propagate(layer, rotary, store)
            if progress and method == SMOOTHQUANT:
                bar.set_postfix({"alpha": res.alpha, "err": f"{res.err_best:.2e}", "err_none": f"{res.err_none:.2e}"})
            elif progress:  # AWQ: err_awq, GPTQ / AWQ-GPTQ: err (the method's own)
                err = ("err_awq", res.err_awq) if method == "awq" else ("err", res.err_method)
                bar.set_postfix({err[0]: f"{err[1]:.2e}", "err_rtn": f"{res.err_rtn:.2e}"})
            # norms and biases changed by folding the scales: written instead of the source's
            src_dtypes = ckpt.dtypes([n for n in ckpt.keys() if n.startswith(prefix)])
            for k, t in layer.state_dict().items():
                if not any(k == f"{n}.weight" for n in qweights):
                    overrides[prefix + k] = t.detach().to(src_dtypes.get(prefix + k, torch.float32)).clone()
        else:
            qweights = rtn_quantize_layer(layer, spec)
            report.layers.append({"index": i, "seconds": round(time.perf_counter() - t0, 3)})
        spill.add_layer(i, {prefix + n: qw for n, qw in qweights.items()})
        if method == "awq":
            report.layers.append(_layer_dict(results[-1]))
        elif method == SMOOTHQUANT:
            report.layers.append(asdict(results[-1]))
        elif method in GPTQ_METHODS:
            report.layers.append(gptq_layer.layer_dict(results[-1]))
        del layer, qweights
        release_freed_memory()
    return results, overrides
