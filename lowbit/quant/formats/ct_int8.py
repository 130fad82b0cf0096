"""compressed-tensors "int-quantized" W8A8 layout (what llm-compressor writes for SmoothQuant /
W8A8-int8 and vLLM's CompressedTensorsW8A8Int8 scheme loads).

Per linear W[out, in] (facts from llm-compressor W8A8 checkpoints' config.json and tensors):

    weight             int8 [out, in]      symmetric codes in [-127, 127]
    weight_scale       [out, 1] in the model dtype (channel strategy)
    weight_zero_point  int8 [out, 1], optional; all zero for symmetric weights

config group: weights {num_bits 8, type int, symmetric, strategy "channel", dynamic false},
input_activations {num_bits 8, type int, symmetric, strategy "token", dynamic true}: the
activations are quantized per token at run time, so nothing about them is stored. Static
activation scales (dynamic false, an input_scale tensor) are refused: lowbit's kernels quantize
per token.

QuantizedWeight holds the codes unsigned (q = w + 128, zeros 128), like every other 8-bit form.
"""
from __future__ import annotations

import torch

from lowbit.errors import QuantizationError
from lowbit.layers.qweight import QuantizedWeight
from lowbit.quant.formats.compressed_tensors import config_of

FORMAT = "int-quantized"
TENSOR_NAMES = ("weight", "weight_scale", "weight_zero_point")


def check(qw: QuantizedWeight, name: str = "layer") -> None:
    if qw.bits != 8 or not qw.sym or qw.group_size != qw.in_features or not bool((qw.zeros == 128).all()):
        raise QuantizationError(
            f"{name}: the int-quantized W8A8 layout holds 8-bit symmetric per-channel weights "
            f"(got {qw.bits} bits, group {qw.group_size}, sym {qw.sym})"
        )


def pack(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float16, name: str = "layer") -> dict[str, torch.Tensor]:
    check(qw, name)
    return {
        "weight": (qw.q.to(torch.int16) - 128).to(torch.int8).contiguous(),
        "weight_scale": qw.scales.reshape(-1, 1).to(scale_dtype).contiguous(),
    }


def unpack(tensors: dict[str, torch.Tensor], name: str = "layer") -> QuantizedWeight:
    for key in ("weight", "weight_scale"):
        if key not in tensors:
            raise QuantizationError(f"{name}: {key} is missing")
    w, scale = tensors["weight"], tensors["weight_scale"]
    if w.dtype != torch.int8 or w.dim() != 2:
        raise QuantizationError(f"{name}: int-quantized weight must be int8 [out, in], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    if scale.numel() != n:
        raise QuantizationError(f"{name}: weight_scale has shape {tuple(scale.shape)}; expected ({n}, 1) (channel strategy)")
    zp = tensors.get("weight_zero_point")
    if zp is not None and bool(zp.ne(0).any()):
        raise QuantizationError(f"{name}: asymmetric int8 weights (nonzero weight_zero_point) are not supported")
    return QuantizedWeight(
        q=(w.to(torch.int16) + 128).to(torch.uint8), scales=scale.reshape(n, 1).to(torch.float32).contiguous(),
        zeros=torch.full((n, 1), 128, dtype=torch.uint8), bits=8, group_size=k, sym=True,
    )


def activation_scheme() -> dict:
    return {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
        "dynamic": True, "actorder": None, "observer": None, "block_structure": None,
    }


def quantization_config(ignore: list[str] | None = None) -> dict:
    """config.json "quantization_config" of a W8A8 int8 checkpoint (dynamic per-token activations)."""
    weights = {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
        "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None,
    }
    return config_of(weights, activation_scheme(), FORMAT, ignore)


def check_activations(group: dict, group_name: str = "group_0") -> None:
    """Accept only what the kernels do: int8, symmetric, dynamic, per token."""
    a = group.get("input_activations") or {}
    ok = (int(a.get("num_bits", 0)) == 8 and str(a.get("type", "int")).lower() == "int"
          and bool(a.get("symmetric", True)) and a.get("dynamic") in (True, "true")
          and str(a.get("strategy", "token")).lower() == "token")
    if not ok:
        raise QuantizationError(
            f"config group {group_name}: input_activations {a} are not supported; lowbit runs int8 activations "
            "quantized dynamically per token, symmetric (static or asymmetric activation scales are not)"
        )
    if group.get("output_activations"):
        raise QuantizationError(f"config group {group_name}: output activation quantization is not supported")
