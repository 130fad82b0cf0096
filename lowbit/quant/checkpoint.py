"""Write and read quantized Hugging Face checkpoints (AutoAWQ GEMM or compressed-tensors).

Layout written: config.json (the model's config plus "quantization_config"), model.safetensors
or model-0000i-of-0000n.safetensors shards with model.safetensors.index.json, and the tokenizer /
generation / chat-template files copied from the source model.

Dtype conventions (what the reference tools write, so their loaders see what they expect):
  awq:                every floating tensor, scales included, is float16 and config dtype is
                      float16, as AutoAWQ saves. Norms and embeddings stored as bfloat16/float32
                      lose precision; values beyond float16's range are refused, not saved as inf.
  compressed-tensors: floating tensors and scales are stored in the model's own dtype from
                      hf_config (bfloat16 for most models), as llm-compressor saves a model
                      loaded with its native dtype, so norms/embeddings lose nothing relative to
                      the source checkpoint; a float32 pipeline does not double their size.

Writes are atomic: everything goes to a temporary folder next to out_dir, which is renamed into
place only when complete, so a reader never sees a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.errors import LowbitError, ModelLoadError, QuantizationError
from lowbit.quant.formats import actorder, awq_gemm
from lowbit.quant.formats import compressed_tensors as ct
from lowbit.quant.qweight import QuantizedWeight

FORMATS = ("awq", "compressed-tensors")
MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a served model needs besides weights and config.json.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
_NEVER_QUANTIZED = {"lm_head", "wte", "wpe", "word_embeddings", "embed_out"}
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


# ============================================================================= saving


def save_quantized(
    out_dir: str | Path,
    *,
    hf_config: dict,
    fp_tensors: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedWeight],
    fmt: str,
    copy_files_from: str | Path | None = None,
    force: bool = False,
    extra_files: dict[str, bytes] | None = None,
    modules_to_not_convert: list[str] | None = None,
    scale_dtype: torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    input_perms: dict[str, torch.Tensor] | None = None,
    actorder_name: str | None = None,
) -> Path:
    """Write a checkpoint loadable by vLLM / transformers (and by load_quantized).

    quantized maps module names ("model.layers.0.self_attn.q_proj") to weights; biases and every
    other tensor come in fp_tensors under their full names. modules_to_not_convert: linears left
    unquantized; by default every 2-D "<m>.weight" in fp_tensors that is not an embedding or the
    LM head (e.g. one down_proj kept in full precision). scale_dtype: float16 for AWQ; for
    compressed-tensors the model dtype (storage_scale_dtype), unless the scales are exactly
    float16 values that the model dtype would round, in which case float16 keeps them exact.
    input_perms: act-order weights (group-contiguous in perm order, formats/actorder.py), written
    as compressed-tensors actorder "group" with weight_g_idx; actorder_name: the config's
    "actorder" when there are none (GPTQ's "weight" order leaves no trace in the tensors).
    Returns out_dir.
    """
    out_dir = Path(out_dir).absolute()
    if input_perms and fmt != "compressed-tensors":
        raise QuantizationError("act-order (g_idx) weights can be saved in the compressed-tensors format only")
    _check_destination(out_dir, force)
    bits, group_size, sym = _uniform_params(quantized, fmt)
    _check_names(fp_tensors, quantized)
    skipped = _not_converted(fp_tensors, quantized) if modules_to_not_convert is None else list(modules_to_not_convert)
    if fmt == "awq":
        _check_awq_skips(skipped, quantized)
    scale_dtype = scale_dtype or _choose_scale_dtype(fmt, hf_config, quantized)
    tensors = _packed_tensors(quantized, fmt, scale_dtype, input_perms or {})
    _add_fp_tensors(tensors, fp_tensors, _fp_dtype(fmt, hf_config))
    config = _output_config(hf_config, fmt, bits, group_size, sym, skipped, fp_tensors)
    if fmt == "compressed-tensors" and (input_perms or actorder_name):
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = (
            "group" if input_perms else actorder_name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_shards(tmp, tensors, max_shard_bytes)
        _write_bytes(tmp / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if copy_files_from is not None:
            _copy_side_files(Path(copy_files_from), tmp)
        for name, data in (extra_files or {}).items():
            _write_bytes(tmp / _plain_name(name), data)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def storage_scale_dtype(fmt: str, hf_config: dict) -> torch.dtype:
    """The dtype scales are stored in; pass it to quantize_weight(scale_dtype=...) so the codes
    are rounded against exactly the scales that get saved."""
    if fmt == "awq":
        return torch.float16
    return _DTYPE_NAMES.get(_config_dtype(hf_config) or "", torch.float16)


def _choose_scale_dtype(fmt: str, hf_config: dict, quantized: dict[str, QuantizedWeight]) -> torch.dtype:
    preferred = storage_scale_dtype(fmt, hf_config)
    if fmt == "awq" or preferred == torch.float16:
        return preferred

    def exact(dtype: torch.dtype) -> bool:
        return all(torch.equal(qw.scales.to(dtype).to(qw.scales.dtype), qw.scales) for qw in quantized.values())

    if not exact(preferred) and exact(torch.float16):
        return torch.float16
    return preferred


def _fp_dtype(fmt: str, hf_config: dict) -> torch.dtype | None:
    """Storage dtype of non-quantized floating tensors (None: keep each tensor's own)."""
    if fmt == "awq":
        return torch.float16
    return _DTYPE_NAMES.get(_config_dtype(hf_config) or "")


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise LowbitError(f"output folder {out_dir} already exists; pass force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"output path {out_dir} exists and is not a folder")


def _uniform_params(quantized: dict[str, QuantizedWeight], fmt: str) -> tuple[int, int, bool]:
    """One bits / group size / symmetry for the whole model: both formats' configs hold one.
    Returns the config group size, -1 when every layer is per-channel."""
    if fmt not in FORMATS:
        raise LowbitError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not quantized:
        raise QuantizationError("no quantized layers to save")
    bits = {qw.bits for qw in quantized.values()}
    syms = {qw.sym for qw in quantized.values()}
    grouped = {qw.group_size for qw in quantized.values() if qw.group_size != qw.in_features}
    if len(bits) > 1 or len(syms) > 1 or len(grouped) > 1:
        raise QuantizationError(
            f"all layers must share bits, group size and symmetry to be saved as {fmt} "
            f"(found bits {sorted(bits)}, group sizes {sorted(grouped)}, sym {sorted(syms)})"
        )
    group_size = grouped.pop() if grouped else -1
    if group_size > 0:
        # a layer as wide as one group is both; any other per-channel layer breaks the config
        odd = [n for n, qw in quantized.items() if qw.group_size != group_size]
        if odd:
            raise QuantizationError(f"layers {odd[:3]} are per-channel while the rest use group size {group_size}")
    return bits.pop(), group_size, syms.pop()


def _check_names(fp_tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight]) -> None:
    clash = sorted(f"{m}.weight" for m in quantized if f"{m}.weight" in fp_tensors)
    if clash:
        raise ValueError(f"{clash[0]} is given in full precision but its module is quantized")


def _not_converted(fp_tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight]) -> list[str]:
    """Linears left in full precision: every 2-D "<m>.weight" that is not an embedding or the
    LM head (those are never quantized by either format's loaders)."""
    found = []
    for key, t in fp_tensors.items():
        if not key.endswith(".weight") or t.dim() != 2:
            continue
        module = key[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if module not in quantized and leaf not in _NEVER_QUANTIZED and "embed" not in leaf:
            found.append(module)
    return sorted(found)


def _check_awq_skips(skipped: list[str], quantized: dict[str, QuantizedWeight]) -> None:
    """vLLM and AutoAWQ skip a module when any modules_to_not_convert entry is a *substring* of
    its name, so an entry must not also hit a quantized module (e.g. "mlp.gate" vs "mlp.gate_proj")."""
    for entry in skipped:
        hit = next((m for m in quantized if entry in m), None)
        if hit is not None:
            raise QuantizationError(
                f"unquantized module {entry!r} cannot be listed in AWQ's modules_to_not_convert: "
                f"AWQ loaders match it as a substring and would also skip quantized {hit!r}"
            )


def _packed_tensors(
    quantized: dict[str, QuantizedWeight], fmt: str, scale_dtype: torch.dtype, perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        if name in perms:  # codes back in channel order, the group of each channel in g_idx
            tensors[f"{name}.{actorder.G_IDX}"] = actorder.g_idx_of(perms[name], qw.group_size)
            qw = actorder.stored_columns(qw, perms[name])
        parts = awq_gemm.pack(qw, name) if fmt == "awq" else ct.pack(qw, scale_dtype, name)
        for key, t in parts.items():
            tensors[f"{name}.{key}"] = t
    return tensors


def _add_fp_tensors(
    tensors: dict[str, torch.Tensor], fp_tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> None:
    """Cast floating tensors for the format; clone shared storage (tied embeddings), which
    safetensors refuses to write twice."""
    seen: set[int] = set()
    for key, t in fp_tensors.items():
        if key in tensors:
            raise ValueError(f"tensor {key} is both a packed quantized tensor and a full-precision one")
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            if t.numel() and t.abs().max() > torch.finfo(dtype).max:
                raise LowbitError(
                    f"{key} holds values beyond {dtype}'s range, the dtype this format stores it in"
                    + ("; save as compressed-tensors instead" if dtype == torch.float16 else "")
                )
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        tensors[key] = t


def _config_dtype(hf_config: dict) -> str | None:
    value = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def _output_config(hf_config, fmt, bits, group_size, sym, skipped, fp_tensors) -> dict:
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    if fmt == "awq":
        # Symmetric weights are stored with explicit zeros of 8 (see awq_gemm): zero_point stays true.
        config["quantization_config"] = awq_gemm.quantization_config(bits, group_size, True, skipped)
        dtype = "float16"
    else:
        config["quantization_config"] = ct.quantization_config(bits, group_size, sym, ["lm_head", *skipped])
        dtype = _config_dtype(hf_config) or _first_float_dtype(fp_tensors)
    config["torch_dtype"] = dtype  # read by transformers 4.x and vLLM
    config["dtype"] = dtype  # transformers 5.x's name for it
    return config


def _first_float_dtype(fp_tensors: dict[str, torch.Tensor]) -> str:
    for t in fp_tensors.values():
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return "float16"


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], folder / SINGLE_FILE)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, folder / fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_bytes(folder / INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # transformers refuses safetensors files without metadata {"format": "pt"}
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync(path)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems do not support fsync on folders
        pass


def _plain_name(name: str) -> str:
    if not name or Path(name).name != name or name in (".", ".."):
        raise LowbitError(f"extra file name {name!r} must be a plain file name")
    return name


def _copy_side_files(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise LowbitError(f"cannot copy tokenizer files: {src} is not a folder")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _swap_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished folder into place; an old one is moved aside first and deleted only
    after the new one is in place (restored if the rename fails)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)  # fails if something appeared there meanwhile, never merges
        _fsync_dir(out_dir.parent)
        return
    if not force:
        raise LowbitError(f"output folder {out_dir} already exists; pass force to replace it")
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


# ============================================================================= loading


def load_quantized(model_dir: str | Path) -> QuantizedCheckpoint:
    """Read a quantized checkpoint written by us, AutoAWQ (GEMM) or llm-compressor (pack-quantized)."""
    folder = _checkpoint_folder(Path(model_dir))
    config = _read_config(folder)
    qcfg = _quantization_config(folder, config)
    files = _weight_files(folder)
    method = str(qcfg.get("quant_method", "")).lower()
    with ExitStack() as stack:
        handles = {f: _open(stack, f) for f in files}
        where = {key: f for f, h in handles.items() for key in h.keys()}
        if method == "awq":
            return _load_awq(qcfg, config, handles, where)
        if method == "compressed-tensors":
            return _load_ct(qcfg, config, handles, where)
        if method == "gptq":
            from lowbit.quant.gptq_checkpoint import load_gptq

            return load_gptq(qcfg, config, lambda key: _get(handles, where, key), where)
    raise ModelLoadError(
        f"{folder}: quantization method {qcfg.get('quant_method')!r} is not supported; "
        "expected AWQ (GEMM), compressed-tensors (pack-quantized) or GPTQ (AutoGPTQ / GPTQModel)"
    )


def _checkpoint_folder(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(_pickle_message(path))
        raise ModelLoadError(f"{path} is a file; pass the checkpoint folder holding config.json")
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint folder {path} does not exist")
    return path


def _pickle_message(path: Path) -> str:
    return (
        f"{path.name} is a pickle checkpoint; lowbit loads safetensors only, because unpickling "
        "can run arbitrary code. Convert it to safetensors with a tool you trust first."
    )


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
    for name in ("quant_config.json", "quantize_config.json"):  # early AutoAWQ releases
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{name} in {folder} is not valid JSON: {e}") from e
            data.setdefault("quant_method", "gptq" if "desc_act" in data else "awq")  # AutoGPTQ's has desc_act
            return data
    raise ModelLoadError(f"{folder} is not a quantized checkpoint: config.json has no quantization_config")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{INDEX_FILE} in {folder} is unreadable: {e}") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(_pickle_message(pickles[0]))
    raise ModelLoadError(f"{folder} has no .safetensors weight files")


def _open(stack: ExitStack, path: Path):
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as e:  # safetensors raises its own error type for bad headers / short files
        raise ModelLoadError(f"{path.name}: corrupt or truncated safetensors file ({e})") from e


def _get(handles, where, key: str) -> torch.Tensor:
    path = where[key]
    try:
        return handles[path].get_tensor(key)
    except Exception as e:
        raise ModelLoadError(f"{path.name}: cannot read tensor {key} ({e})") from e


def _modules_with(where: dict, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in where if k.endswith(suffix))


def _fp_rest(handles, where, consumed: set[str]) -> dict[str, torch.Tensor]:
    return {k: _get(handles, where, k) for k in sorted(where) if k not in consumed}


def _load_awq(qcfg: dict, config: dict, handles, where) -> QuantizedCheckpoint:
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ModelLoadError(f"AWQ version {qcfg.get('version')!r} is not supported; only the GEMM layout is")
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    group_size = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    if bits != 4:
        raise ModelLoadError(f"AWQ GEMM checkpoints hold 4-bit weights; this one says {bits} bits")
    quantized, consumed = {}, set()
    for module in _modules_with(where, ".qweight"):
        keys = {k: f"{module}.{k}" for k in awq_gemm.TENSOR_NAMES}
        missing = [v for v in keys.values() if v not in where]
        if missing:
            raise ModelLoadError(f"AWQ layer {module} is incomplete: {', '.join(missing)} missing")
        parts = {k: _get(handles, where, v) for k, v in keys.items()}
        quantized[module] = _decode(lambda: awq_gemm.unpack(parts, group_size, module), where[keys["qweight"]])
        consumed.update(keys.values())
    _require_layers(quantized, where)
    return QuantizedCheckpoint(
        fmt="awq",
        bits=bits,
        group_size=group_size,
        sym=all(qw.sym for qw in quantized.values()),
        fp_tensors=_fp_rest(handles, where, consumed),
        quantized=quantized,
        modules_to_not_convert=list(qcfg.get("modules_to_not_convert") or []),
        config=config,
    )


def _load_ct(qcfg: dict, config: dict, handles, where) -> QuantizedCheckpoint:
    version = qcfg.get("version")
    quantized, consumed, first, perms = {}, set(), None, {}
    for module in _modules_with(where, ".weight_packed"):
        try:
            gname, group = ct.group_for(qcfg, module)
            args = ct.weight_args(group, gname)
        except QuantizationError as e:
            raise ModelLoadError(f"compressed-tensors config: {e}") from e
        fmt = ct.group_format(qcfg, group)
        if fmt != ct.FORMAT:
            raise ModelLoadError(f"compressed-tensors format {fmt!r} is not supported; only {ct.FORMAT!r} is")
        keys = {k: f"{module}.{k}" for k in ct.TENSOR_NAMES if f"{module}.{k}" in where}
        parts = {k: _get(handles, where, v) for k, v in keys.items()}
        qw = _decode(lambda: ct.unpack(parts, args, version, module), where[f"{module}.weight_packed"])
        qw, perm = _check_g_idx(handles, where, module, qw, consumed)
        if perm is not None:
            perms[module] = perm
        quantized[module] = qw
        consumed.update(keys.values())
        first = first or args
    _require_layers(quantized, where)
    return QuantizedCheckpoint(
        fmt="compressed-tensors",
        bits=first.bits,
        group_size=first.group_size if first.group_size else -1,
        sym=first.sym,
        fp_tensors=_fp_rest(handles, where, consumed),
        quantized=quantized,
        modules_to_not_convert=list(qcfg.get("ignore") or []),
        config=config,
        input_perms=perms,
    )


def _check_g_idx(handles, where, module: str, qw: QuantizedWeight, consumed: set[str]):
    """Activation-order checkpoints map columns to groups through g_idx: regrouped here into the
    group-contiguous layout plus an input permutation (formats/actorder.py). Returns (qw, perm)."""
    key = f"{module}.{actorder.G_IDX}"
    if key not in where:
        return qw, None
    consumed.add(key)
    return _decode(lambda: actorder.regroup(qw, _get(handles, where, key), module), where[key])


def _decode(fn, path: Path) -> QuantizedWeight:
    try:
        return fn()
    except QuantizationError as e:
        raise ModelLoadError(f"{path.name}: {e}") from e


def _require_layers(quantized: dict, where: dict) -> None:
    if not quantized:
        raise ModelLoadError("the checkpoint's config says it is quantized but no quantized layers were found")
