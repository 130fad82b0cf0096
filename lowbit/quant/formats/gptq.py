"""The AutoGPTQ / GPTQModel checkpoint layout ("quant_method": "gptq"), read into QuantizedWeight.

Per linear W[out, in] with group size G and b bits (facts from AutoGPTQ's and GPTQModel's
QuantLinear pack/unpack code and vLLM's GPTQ loader):

    qweight  int32   [in * b / 32, out]   codes packed down the INPUT dim: value k of a column
                                           at global bit k * b (little-endian, values may straddle
                                           words for 3 bits: AutoGPTQ's 3-bit scheme is exactly that)
    qzeros   int32   [n_groups, out * b / 32]   zero points packed along the OUTPUT dim, same order
    scales   float16 [n_groups, out]
    g_idx    int32   [in]                  group of each input channel (c // G without act order)
    bias     float16 [out]                 only where the source linear had one

Dequantization: W[o, c] = (q[o, c] - zero[o, g_idx[c]]) * scale[o, g_idx[c]].

Zero points, "checkpoint_format" (GPTQModel; its newer "format" key says the same):
    "gptq" (v1, AutoGPTQ and the hub's default): the stored value is zero - 1, a legacy of
           AutoGPTQ's packer; every reader adds 1 back. A zero point of 0 is stored as -1, which
           wraps to all ones in its slot: we read that back as 0 (2**b is no valid zero).
    "gptq_v2": the zero itself.
Symmetric checkpoints ("sym": true) store zero 2**(b-1) (v1: 2**(b-1) - 1) like any other zero,
so they decode the same way; `sym` is reported from the zeros themselves.

desc_act (act order): g_idx is a permutation of the trivial map; formats/actorder.regroup turns
the weight group-contiguous at load. Only int32 packing ("pack_dtype") is supported, and 2, 3, 4
and 8 bits, the widths AutoGPTQ/GPTQModel write for this layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import QuantizationError
from lowbit.quant.primitives import packed_words, unpack_int32
from lowbit.layers.qweight import QuantizedWeight

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GptqArgs:
    bits: int
    group_size: int  # -1 = per-channel
    desc_act: bool
    sym: bool
    v2: bool  # zero points stored as-is (gptq_v2), not minus one (gptq v1)


def args_from_config(qcfg: dict) -> GptqArgs:
    """Parse a GPTQ quantization_config / quantize_config.json; refuse layouts we cannot read."""
    if qcfg.get("is_marlin_format"):
        raise QuantizationError("GPTQ checkpoints in AutoGPTQ's legacy Marlin layout are not supported")
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise QuantizationError(f"GPTQ checkpoint format {fmt!r} is not supported; expected {' or '.join(CHECKPOINT_FORMATS)}")
    pack_dtype = str(qcfg.get("pack_dtype") or "int32").replace("torch.", "")
    if pack_dtype != "int32":
        raise QuantizationError(f"GPTQ pack_dtype {pack_dtype!r} is not supported; only int32 packing is")
    bits = int(qcfg.get("bits", 4))
    if bits not in BITS:
        raise QuantizationError(f"GPTQ checkpoints with {bits} bits are not supported; expected one of {BITS}")
    group_size = int(qcfg.get("group_size", 128))
    if group_size == 0 or group_size < -1:
        raise QuantizationError(f"GPTQ group_size must be positive or -1, got {group_size}")
    return GptqArgs(bits, group_size, bool(qcfg.get("desc_act", False)), bool(qcfg.get("sym", True)), fmt == "gptq_v2")


def unpack(tensors: dict[str, torch.Tensor], args: GptqArgs, name: str = "layer") -> tuple[QuantizedWeight, torch.Tensor | None]:
    """GPTQ tensors -> (QuantizedWeight with codes in the stored channel order, g_idx or None).

    The QuantizedWeight's scales and zeros are indexed by group number; when g_idx is returned
    it is only meaningful together with it (formats/actorder.regroup makes it contiguous)."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise QuantizationError(f"{name}: GPTQ tensors missing: {', '.join(missing)}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for key, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise QuantizationError(f"{name}: {key} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    bits = args.bits
    out_features = qweight.shape[1]
    g_idx = tensors.get("g_idx")
    in_features = int(g_idx.numel()) if g_idx is not None else qweight.shape[0] * 32 // bits
    if qweight.shape[0] != packed_words(in_features, bits, "dense"):
        raise QuantizationError(f"{name}: qweight has {qweight.shape[0]} rows, expected {packed_words(in_features, bits, 'dense')} "
                                f"for {in_features} {bits}-bit inputs")
    g = in_features if args.group_size == -1 else args.group_size
    if in_features % g:
        raise QuantizationError(f"{name}: group size {g} does not divide in_features={in_features}")
    n_groups = in_features // g
    expected = {"scales": (n_groups, out_features), "qzeros": (n_groups, packed_words(out_features, bits, "dense"))}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise QuantizationError(f"{name}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    q = unpack_int32(qweight.t().contiguous(), bits, in_features, "dense")
    zeros = unpack_int32(qzeros, bits, out_features, "dense").t().contiguous()
    if not args.v2:
        zeros = ((zeros.to(torch.int16) + 1) & (2**bits - 1)).to(torch.uint8)
    qw = QuantizedWeight(
        q=q, scales=scales.t().to(torch.float32).contiguous(), zeros=zeros, bits=bits, group_size=g,
        sym=bool((zeros == 2 ** (bits - 1)).all()),
    )
    return qw, (None if g_idx is None else g_idx.to(torch.int64))
