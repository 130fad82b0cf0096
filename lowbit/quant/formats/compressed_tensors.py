"""compressed-tensors "pack-quantized" layout (what llm-compressor writes and vLLM loads).

Per linear W[out, in] (facts from compressed-tensors 0.20 PackedQuantizationCompressor):

    weight_packed      int32 [out, ceil(in * bits / 32)]   signed codes + 2**(bits-1), packed
    weight_scale       [out, n_groups] in the model dtype   (channel: n_groups = 1)
    weight_zero_point  int32 [ceil(out * bits / 32), n_groups], asymmetric only: the signed
                       zero point + 2**(bits-1), packed along dim 0 (down the output rows)
    weight_shape       int64 [2] = [out, in]

The library stores signed integers and adds 2**(bits-1) before packing, so the packed bit
patterns are exactly our unsigned q and zeros; symmetric weights have no zero point tensor
(implicitly 0 signed, i.e. 2**(bits-1) unsigned).

Packing order changed in compressed-tensors 0.18: up to 0.17 a word held 32 // bits values
("padded", 3-bit wastes 2 bits a word); since 0.18 values are packed densely across word
boundaries. Both agree for 2, 4 and 8 bits. We write dense and read both, telling them apart
by the packed width, and by the config's "version" only when the widths coincide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.errors import QuantizationError
from lowbit.quant.primitives import (
    check_bits,
    pack_int32,
    packed_words,
    resolve_group_size,
    unpack_int32,
)
from lowbit.layers.qweight import QuantizedWeight

FORMAT = "pack-quantized"
# The compressed-tensors release whose layout we write (and checked our packing against).
WRITER_VERSION = "0.20.0"
DENSE_SINCE = (0, 18)
TENSOR_NAMES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


@dataclass(frozen=True)
class WeightArgs:
    """The part of a config group's "weights" entry that decides how tensors decode."""

    bits: int
    group_size: int | None  # None for channel / tensor strategies
    sym: bool
    strategy: str


# ----------------------------------------------------------------------------- pack / unpack


def pack(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float16, name: str = "layer") -> dict[str, torch.Tensor]:
    """QuantizedWeight -> pack-quantized tensors; scales cast to scale_dtype (the model dtype)."""
    check_bits(qw.bits)
    mid = 2 ** (qw.bits - 1)
    if qw.sym and not bool((qw.zeros == mid).all()):
        raise QuantizationError(f"{name}: marked symmetric but its zeros are not all {mid}")
    out = {
        "weight_packed": pack_int32(qw.q, qw.bits, "dense").contiguous(),
        "weight_scale": qw.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([qw.out_features, qw.in_features], dtype=torch.int64),
    }
    if not qw.sym:
        out["weight_zero_point"] = pack_int32(qw.zeros.t().contiguous(), qw.bits, "dense").t().contiguous()
    return out


def unpack(
    tensors: dict[str, torch.Tensor], args: WeightArgs, version: str | None = None, name: str = "layer"
) -> QuantizedWeight:
    """pack-quantized tensors -> QuantizedWeight (scales widened to float32, exact)."""
    bits = args.bits
    check_bits(bits)
    for key in ("weight_packed", "weight_scale"):
        if key not in tensors:
            raise QuantizationError(f"{name}: {key} is missing")
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    out_features = packed.shape[0]
    in_features = _in_features(tensors, packed, bits, version, name)

    group = args.group_size if args.strategy == "group" else None
    g = resolve_group_size(in_features, group)
    n_groups = in_features // g
    scale = _expand(scale.to(torch.float32), out_features, n_groups, "weight_scale", name)
    order = _order(packed.shape[1], in_features, bits, version, name, "weight_packed")
    q = unpack_int32(packed, bits, in_features, order)

    mid = 2 ** (bits - 1)
    if args.sym:
        zeros = torch.full((out_features, n_groups), mid, dtype=torch.uint8)
    else:
        zeros = _zeros(tensors.get("weight_zero_point"), bits, out_features, n_groups, version, name)
    return QuantizedWeight(q=q.contiguous(), scales=scale, zeros=zeros, bits=bits, group_size=g, sym=args.sym)


def _in_features(tensors, packed, bits, version, name) -> int:
    shape = tensors.get("weight_shape")
    if shape is not None:
        dims = [int(d) for d in shape.reshape(-1).tolist()]
        if len(dims) != 2 or dims[0] != packed.shape[0]:
            raise QuantizationError(f"{name}: weight_shape {dims} does not match weight_packed {tuple(packed.shape)}")
        return dims[1]
    # Without weight_shape, assume the packed width is exactly full (true for in % 32 == 0).
    return packed.shape[1] * 32 // bits


def _expand(t: torch.Tensor, rows: int, cols: int, what: str, name: str) -> torch.Tensor:
    """Scale / zero point to [rows, cols]; a single value (tensor strategy) is broadcast."""
    if t.numel() == 1:
        return t.reshape(1, 1).expand(rows, cols).contiguous()
    if tuple(t.shape) != (rows, cols):
        raise QuantizationError(f"{name}: {what} has shape {tuple(t.shape)}, expected {(rows, cols)}")
    return t.contiguous()


def _zeros(zp, bits, out_features, n_groups, version, name) -> torch.Tensor:
    """Asymmetric zero points: packed int32 down dim 0 (current) or plain signed ints (old)."""
    if zp is None:
        raise QuantizationError(f"{name}: asymmetric weights need weight_zero_point")
    mid = 2 ** (bits - 1)
    packed_rows = {packed_words(out_features, bits, o) for o in ("dense", "padded")}
    if zp.dtype == torch.int32 and zp.dim() == 2 and zp.shape[0] in packed_rows and zp.shape[0] != out_features:
        order = _order(zp.shape[0], out_features, bits, version, name, "weight_zero_point")
        return unpack_int32(zp.t().contiguous(), bits, out_features, order).t().contiguous()
    signed = _expand(zp.to(torch.int32), out_features, n_groups, "weight_zero_point", name)
    if int(signed.min()) < -mid or int(signed.max()) >= mid:
        raise QuantizationError(f"{name}: weight_zero_point outside the signed {bits}-bit range")
    return (signed + mid).to(torch.uint8)


def _order(words: int, n: int, bits: int, version: str | None, name: str, what: str) -> str:
    dense, padded = packed_words(n, bits, "dense"), packed_words(n, bits, "padded")
    if words == dense and (words != padded or 32 % bits == 0 or _is_dense_version(version)):
        return "dense"
    if words == padded:
        return "padded"
    raise QuantizationError(
        f"{name}: {what} has {words} int32 words for {n} {bits}-bit values "
        f"(expected {dense}, or {padded} from compressed-tensors <= 0.17)"
    )


def _is_dense_version(version: str | None) -> bool:
    nums = re.findall(r"\d+", version or "")
    if len(nums) < 2:
        return True
    return (int(nums[0]), int(nums[1])) >= DENSE_SINCE


# ----------------------------------------------------------------------------- config


def quantization_config(bits: int, group_size: int, sym: bool, ignore: list[str] | None = None) -> dict:
    """config.json "quantization_config" as llm-compressor writes it (group_size -1 = channel)."""
    check_bits(bits)
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": group_size if group_size > 0 else None,
        "strategy": "group" if group_size > 0 else "channel",
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return config_of(weights, None, FORMAT, ignore)


def config_of(weights: dict, input_activations: dict | None, fmt: str, ignore: list[str] | None) -> dict:
    """The "quantization_config" around one config group (every compressed-tensors writer's frame)."""
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "version": WRITER_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": input_activations,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": list(ignore) if ignore is not None else ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def weight_args(group: dict, group_name: str = "group_0") -> WeightArgs:
    """Parse one config group; refuse what a weight-only int serving path cannot honour."""
    w = group.get("weights")
    if not w:
        raise QuantizationError(f"config group {group_name} quantizes no weights")
    if group.get("input_activations") or group.get("output_activations"):
        raise QuantizationError(
            f"config group {group_name} also quantizes activations; only weight-only (WnA16) "
            "compressed-tensors checkpoints are supported"
        )
    if str(w.get("type", "int")).lower() != "int":
        raise QuantizationError(f"config group {group_name}: weight type {w.get('type')!r} is not int")
    strategy = str(w.get("strategy") or ("group" if (w.get("group_size") or -1) > 0 else "channel")).lower()
    if strategy not in ("group", "channel", "tensor"):
        raise QuantizationError(f"config group {group_name}: weight strategy {strategy!r} is not supported")
    return WeightArgs(
        bits=int(w.get("num_bits", 8)),
        group_size=int(w["group_size"]) if strategy == "group" else None,
        sym=bool(w.get("symmetric", True)),
        strategy=strategy,
    )


def group_format(qcfg: dict, group: dict) -> str:
    return str(group.get("format") or qcfg.get("format") or FORMAT)


def _target_matches(target: str, module_name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return target == module_name or module_name.endswith("." + target)


def group_for(qcfg: dict, module_name: str) -> tuple[str, dict]:
    """The config group that applies to a quantized linear: a name/regex target wins over the
    generic "Linear" class target, as in compressed-tensors' own matching."""
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise QuantizationError("compressed-tensors config has no config_groups")
    fallback = None
    for gname, group in groups.items():
        for target in group.get("targets") or []:
            if target == "Linear":
                fallback = fallback or (gname, group)
            elif _target_matches(target, module_name):
                return gname, group
    if fallback is None:
        raise QuantizationError(f"no compressed-tensors config group targets {module_name}")
    return fallback
