"""Read quantized Hugging Face checkpoints: ours, AutoAWQ's (GEMM), llm-compressor's
(compressed-tensors pack-quantized) or AutoGPTQ / GPTQModel's (load_gptq.py), into one canonical
form, QuantizedCheckpoint.

The format is detected from config.json's quantization_config (or the quant_config.json /
quantize_config.json of early AutoAWQ and AutoGPTQ releases); tensors are read through the one safetensors reader (models.weights).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import ModelLoadError, QuantizationError
from ...models.weights import PICKLE_SUFFIXES, SafetensorsCheckpoint, pickle_refusal
from ..formats import actorder, awq_gemm
from ..formats import compressed_tensors as ct
from ..formats import ct_int8
from ...layers.qweight import QuantizedWeight

# quantization configs kept beside config.json by early AutoAWQ / AutoGPTQ releases
LEGACY_CONFIG_FILES = ("quant_config.json", "quantize_config.json")


@dataclass
class QuantizedCheckpoint:
    """A loaded quantized checkpoint in canonical form.

    group_size is the config's value (-1 = per-channel); each QuantizedWeight carries its real one.
    fp_tensors holds every tensor that is not part of a quantized linear (norms, embeddings,
    lm_head, biases), in the dtype stored on disk.
    """

    fmt: str
    bits: int
    group_size: int
    sym: bool
    fp_tensors: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedWeight]
    modules_to_not_convert: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    # act-order weights (formats/actorder.py): module -> input-channel permutation; such a
    # module's QuantizedWeight is group-contiguous in that order (column j = channel perm[j])
    input_perms: dict[str, torch.Tensor] = field(default_factory=dict)
    # "int8": the linears also quantize their inputs (W8A8, compressed-tensors int-quantized); None: weight-only
    activations: str | None = None


def load_quantized(model_dir: str | Path) -> QuantizedCheckpoint:
    """Read a quantized checkpoint written by us, AutoAWQ (GEMM), llm-compressor (pack-quantized) or
    AutoGPTQ / GPTQModel."""
    folder = _checkpoint_folder(Path(model_dir))
    config = _read_config(folder)
    qcfg = _quantization_config(folder, config)
    tensors = SafetensorsCheckpoint(folder)
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "awq":
        return _load_awq(qcfg, config, tensors)
    if method == "compressed-tensors":
        return _load_ct(qcfg, config, tensors)
    if method == "gptq":
        from .load_gptq import load_gptq  # load_gptq builds this module's QuantizedCheckpoint

        return load_gptq(qcfg, config, tensors)
    raise ModelLoadError(
        f"{folder}: quantization method {qcfg.get('quant_method')!r} is not supported; "
        "expected AWQ (GEMM), compressed-tensors (pack-quantized) or GPTQ (AutoGPTQ / GPTQModel)"
    )


def _checkpoint_folder(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(pickle_refusal(path))
        raise ModelLoadError(f"{path} is a file; pass the checkpoint folder holding config.json")
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint folder {path} does not exist")
    return path


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"config.json in {folder} is not valid JSON: {e}") from e


def _quantization_config(folder: Path, config: dict) -> dict:
    qcfg = config.get("quantization_config") or config.get("compression_config")
    if qcfg:
        return qcfg
    for name in LEGACY_CONFIG_FILES:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{name} in {folder} is not valid JSON: {e}") from e
            data.setdefault("quant_method", "gptq" if "desc_act" in data else "awq")  # AutoGPTQ's has desc_act
            return data
    raise ModelLoadError(f"{folder} is not a quantized checkpoint: config.json has no quantization_config")


def _modules_with(tensors: SafetensorsCheckpoint, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in tensors.keys() if k.endswith(suffix))


def _fp_rest(tensors: SafetensorsCheckpoint, consumed: set[str]) -> dict[str, torch.Tensor]:
    names = [k for k in sorted(tensors.keys()) if k not in consumed]
    got = tensors.read(names)
    return {k: got[k] for k in names}


def _load_awq(qcfg: dict, config: dict, tensors: SafetensorsCheckpoint) -> QuantizedCheckpoint:
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ModelLoadError(f"AWQ version {qcfg.get('version')!r} is not supported; only the GEMM layout is")
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    group_size = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    if bits != 4:
        raise ModelLoadError(f"AWQ GEMM checkpoints hold 4-bit weights; this one says {bits} bits")
    quantized, consumed = {}, set()
    for module in _modules_with(tensors, ".qweight"):
        keys = {k: f"{module}.{k}" for k in awq_gemm.TENSOR_NAMES}
        missing = [v for v in keys.values() if v not in tensors]
        if missing:
            raise ModelLoadError(f"AWQ layer {module} is incomplete: {', '.join(missing)} missing")
        got = tensors.read(keys.values())
        parts = {k: got[v] for k, v in keys.items()}
        quantized[module] = _decode(lambda: awq_gemm.unpack(parts, group_size, module), tensors.file_of(keys["qweight"]))
        consumed.update(keys.values())
    _require_layers(quantized)
    return QuantizedCheckpoint(
        fmt="awq",
        bits=bits,
        group_size=group_size,
        sym=all(qw.sym for qw in quantized.values()),
        fp_tensors=_fp_rest(tensors, consumed),
        quantized=quantized,
        modules_to_not_convert=list(qcfg.get("modules_to_not_convert") or []),
        config=config,
    )


def _load_ct(qcfg: dict, config: dict, tensors: SafetensorsCheckpoint) -> QuantizedCheckpoint:
    if str(qcfg.get("format", "")).lower() == ct_int8.FORMAT:
        return _load_ct_int8(qcfg, config, tensors)
    version = qcfg.get("version")
    quantized, consumed, first, perms = {}, set(), None, {}
    for module in _modules_with(tensors, ".weight_packed"):
        try:
            gname, group = ct.group_for(qcfg, module)
            args = ct.weight_args(group, gname)
        except QuantizationError as e:
            raise ModelLoadError(f"compressed-tensors config: {e}") from e
        fmt = ct.group_format(qcfg, group)
        if fmt != ct.FORMAT:
            raise ModelLoadError(f"compressed-tensors format {fmt!r} is not supported; only {ct.FORMAT!r} is")
        keys = {k: f"{module}.{k}" for k in ct.TENSOR_NAMES if f"{module}.{k}" in tensors}
        got = tensors.read(keys.values())
        parts = {k: got[v] for k, v in keys.items()}
        qw = _decode(lambda: ct.unpack(parts, args, version, module), tensors.file_of(f"{module}.weight_packed"))
        qw, perm = _check_g_idx(tensors, module, qw, consumed)
        if perm is not None:
            perms[module] = perm
        quantized[module] = qw
        consumed.update(keys.values())
        first = first or args
    _require_layers(quantized)
    return QuantizedCheckpoint(
        fmt="compressed-tensors",
        bits=first.bits,
        group_size=first.group_size if first.group_size else -1,
        sym=first.sym,
        fp_tensors=_fp_rest(tensors, consumed),
        quantized=quantized,
        modules_to_not_convert=list(qcfg.get("ignore") or []),
        config=config,
        input_perms=perms,
    )


def _load_ct_int8(qcfg: dict, config: dict, tensors: SafetensorsCheckpoint) -> QuantizedCheckpoint:
    """compressed-tensors int-quantized W8A8 (ours or llm-compressor's): int8 weights per channel,
    int8 activations per token at run time."""
    quantized, consumed = {}, set()
    for module in _modules_with(tensors, ".weight_scale"):
        try:
            gname, group = ct.group_for(qcfg, module)
            fmt = ct.group_format(qcfg, group)
            if fmt != ct_int8.FORMAT:
                raise QuantizationError(f"config group {gname} has format {fmt!r}; a W8A8 checkpoint mixes no formats")
            ct_int8.check_activations(group, gname)
        except QuantizationError as e:
            raise ModelLoadError(f"compressed-tensors config: {e}") from e
        if f"{module}.input_scale" in tensors:
            raise ModelLoadError(f"{module}: static activation scales (input_scale) are not supported; "
                                 "lowbit quantizes activations dynamically per token")
        keys = {k: f"{module}.{k}" for k in ct_int8.TENSOR_NAMES if f"{module}.{k}" in tensors}
        got = tensors.read(keys.values())
        parts = {k: got[v] for k, v in keys.items()}
        quantized[module] = _decode(lambda: ct_int8.unpack(parts, module), tensors.file_of(f"{module}.weight_scale"))
        consumed.update(keys.values())
    _require_layers(quantized)
    return QuantizedCheckpoint(
        fmt="compressed-tensors", bits=8, group_size=-1, sym=True, fp_tensors=_fp_rest(tensors, consumed),
        quantized=quantized, modules_to_not_convert=list(qcfg.get("ignore") or []), config=config,
        activations="int8",
    )


def _check_g_idx(tensors: SafetensorsCheckpoint, module: str, qw: QuantizedWeight, consumed: set[str]):
    """Activation-order checkpoints map columns to groups through g_idx: regrouped here into the
    group-contiguous layout plus an input permutation (formats/actorder.py). Returns (qw, perm)."""
    key = f"{module}.{actorder.G_IDX}"
    if key not in tensors:
        return qw, None
    consumed.add(key)
    return _decode(lambda: actorder.regroup(qw, tensors.get(key), module), tensors.file_of(key))


def _decode(fn, path: Path) -> QuantizedWeight:
    try:
        return fn()
    except QuantizationError as e:
        raise ModelLoadError(f"{path.name}: {e}") from e


def _require_layers(quantized: dict) -> None:
    if not quantized:
        raise ModelLoadError("the checkpoint's config says it is quantized but no quantized layers were found")
