"""Write quantized Hugging Face checkpoints (AutoAWQ GEMM or compressed-tensors).

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

Writes are atomic (lowbit.fsio.publish_dir): everything goes to a staging folder next to out_dir,
which is renamed into place only when complete, so a reader never sees a half-written checkpoint;
an existing out_dir is replaced only with force, and survives a failed rewrite.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...errors import LowbitError, QuantizationError
from ...fsio import check_target, publish_dir
from ...models.weights import INDEX_FILE
from ..formats import actorder, awq_gemm
from ..formats import compressed_tensors as ct
from ..formats import ct_int8
from ...layers.qweight import QuantizedWeight

FORMATS = ("awq", "compressed-tensors")
MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
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
    activations: str | None = None,
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
    activations "int8": W8A8 (8-bit symmetric per-channel weights, activations int8 per token at
    run time), written as compressed-tensors "int-quantized" (formats/ct_int8.py).
    Returns out_dir.
    """
    out_dir = Path(out_dir).absolute()
    if input_perms and fmt != "compressed-tensors":
        raise QuantizationError("act-order (g_idx) weights can be saved in the compressed-tensors format only")
    if activations not in (None, "int8"):
        raise QuantizationError(f"activations must be None or 'int8', got {activations!r}")
    if activations and (fmt != "compressed-tensors" or input_perms):
        raise QuantizationError("int8-activation (W8A8) weights are saved as compressed-tensors, without act-order")
    check_target(out_dir, force)
    bits, group_size, sym = _uniform_params(quantized, fmt)
    _check_names(fp_tensors, quantized)
    skipped = _not_converted(fp_tensors, quantized) if modules_to_not_convert is None else list(modules_to_not_convert)
    if fmt == "awq":
        _check_awq_skips(skipped, quantized)
    scale_dtype = scale_dtype or _choose_scale_dtype(fmt, hf_config, quantized)
    tensors = _packed_tensors(quantized, fmt, scale_dtype, input_perms or {}, activations)
    _add_fp_tensors(tensors, fp_tensors, _fp_dtype(fmt, hf_config))
    config = _output_config(hf_config, fmt, bits, group_size, sym, skipped, fp_tensors)
    if activations:
        config["quantization_config"] = ct_int8.quantization_config(["lm_head", *skipped])
    if fmt == "compressed-tensors" and (input_perms or actorder_name):
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = (
            "group" if input_perms else actorder_name)

    with publish_dir(out_dir, replace=force) as tmp:
        _write_shards(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_bytes((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if copy_files_from is not None:
            _copy_side_files(Path(copy_files_from), tmp)
        for name, data in (extra_files or {}).items():
            (tmp / _plain_name(name)).write_bytes(data)
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
    quantized: dict[str, QuantizedWeight], fmt: str, scale_dtype: torch.dtype, perms: dict[str, torch.Tensor],
    activations: str | None = None,
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        if name in perms:  # codes back in channel order, the group of each channel in g_idx
            tensors[f"{name}.{actorder.G_IDX}"] = actorder.g_idx_of(perms[name], qw.group_size)
            qw = actorder.stored_columns(qw, perms[name])
        if activations:
            parts = ct_int8.pack(qw, scale_dtype, name)
        else:
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
    (folder / INDEX_FILE).write_bytes((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # transformers refuses safetensors files without metadata {"format": "pt"}
    save_file(tensors, str(path), metadata={"format": "pt"})


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
