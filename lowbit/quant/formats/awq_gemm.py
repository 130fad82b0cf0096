"""AutoAWQ "GEMM" layout, byte-compatible with AutoAWQ's WQLinear_GEMM buffers.

Per linear W[out, in] with group size G (facts from AutoAWQ's WQLinear_GEMM.from_linear and
vLLM's AWQ dequantization):

    qweight  int32   [in, out / 8]     q transposed to [in, out], 8 columns per word, AWQ order
    qzeros   int32   [in / G, out / 8] zeros transposed to [n_groups, out], packed the same way
    scales   float16 [in / G, out]

Word j of row r holds columns 8j..8j+7; nibble i (bits 4i..4i+3) holds column 8j+AWQ_ORDER[i]
with AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7). Dequantization is (q - zero) * scale.

Symmetric weights: AutoAWQ's GEMM packer cannot store zero_point=False at all (from_linear
asserts zeros is not None), and every GEMM loader reads qzeros unconditionally. So symmetric
weights are written with qzeros = 2**(bits-1) and ``zero_point: true``: that dequantizes
identically everywhere and keeps vLLM on its fast awq_marlin path (marlin has no unsigned-4-bit
type without zero points, so ``zero_point: false`` would drop vLLM to the slow AWQ kernel).
"""
from __future__ import annotations

import torch

from lowbit.errors import QuantizationError
from lowbit.quant.primitives import pack_int32, resolve_group_size, unpack_int32
from lowbit.layers.qweight import QuantizedWeight

BITS = 4
PACK = 32 // BITS
TENSOR_NAMES = ("qweight", "qzeros", "scales")


def check_packable(qw: QuantizedWeight, name: str = "layer") -> None:
    """AWQ GEMM holds 4-bit weights whose out_features is a multiple of 8, nothing else."""
    if qw.bits != BITS:
        raise QuantizationError(f"{name}: the AWQ GEMM format stores 4-bit weights only, got {qw.bits} bits")
    if qw.out_features % PACK != 0:
        raise QuantizationError(
            f"{name}: the AWQ GEMM format needs out_features divisible by {PACK}, got {qw.out_features}"
        )


def pack(qw: QuantizedWeight, name: str = "layer") -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {"qweight", "qzeros", "scales"} (scales rounded to float16)."""
    check_packable(qw, name)
    return {
        "qweight": pack_int32(qw.q.t().contiguous(), BITS, "awq").contiguous(),
        "qzeros": pack_int32(qw.zeros.t().contiguous(), BITS, "awq").contiguous(),
        "scales": qw.scales.t().to(torch.float16).contiguous(),
    }


def unpack(tensors: dict[str, torch.Tensor], group_size: int | None, name: str = "layer") -> QuantizedWeight:
    """{"qweight", "qzeros", "scales"} -> QuantizedWeight (scales widened to float32, exact).

    group_size comes from the config (-1 = per-channel); it must agree with the tensor shapes.
    sym is reported True when every zero is 2**(bits-1), the only symmetric grid AWQ can hold.
    """
    missing = [k for k in TENSOR_NAMES if k not in tensors]
    if missing:
        raise QuantizationError(f"{name}: AWQ tensors missing: {', '.join(missing)}")
    qweight, qzeros, scales = (tensors[k] for k in TENSOR_NAMES)
    in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
    g = resolve_group_size(in_features, group_size)
    n_groups = in_features // g
    expected = {"qzeros": (n_groups, out_features // PACK), "scales": (n_groups, out_features)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise QuantizationError(
                f"{name}: {key} has shape {tuple(tensors[key].shape)}, expected {shape} for "
                f"in={in_features}, out={out_features}, group size {g}"
            )
    q = unpack_int32(qweight, BITS, out_features, "awq").t().contiguous()
    zeros = unpack_int32(qzeros, BITS, out_features, "awq").t().contiguous()
    return QuantizedWeight(
        q=q,
        scales=scales.t().to(torch.float32).contiguous(),
        zeros=zeros,
        bits=BITS,
        group_size=g,
        sym=bool((zeros == 2 ** (BITS - 1)).all()),
    )


def quantization_config(
    bits: int, group_size: int, zero_point: bool = True, modules_to_not_convert: list[str] | None = None
) -> dict:
    """The config.json "quantization_config" AutoAWQ writes (group_size -1 = per-channel)."""
    if bits != BITS:
        raise QuantizationError(f"the AWQ GEMM format stores 4-bit weights only, got {bits} bits")
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert) if modules_to_not_convert else None,
    }
