"""Load an AutoGPTQ / GPTQModel checkpoint into the canonical QuantizedCheckpoint.

Tensor decoding lives in formats/gptq.py; act-order (desc_act) weights are regrouped into
lowbit's group-contiguous layout by formats/actorder.py, their permutations handed on in
QuantizedCheckpoint.input_perms for the model builder to fold or apply (see actorder.py).
"""
from __future__ import annotations

from ...errors import ModelLoadError, QuantizationError
from ...models.weights import SafetensorsCheckpoint
from ..formats import actorder
from ..formats import gptq as gptq_format
from .load import QuantizedCheckpoint


def load_gptq(qcfg: dict, config: dict, tensors: SafetensorsCheckpoint) -> QuantizedCheckpoint:
    """qcfg: the GPTQ quantization config; tensors: every tensor of the checkpoint, read on demand."""
    try:
        args = gptq_format.args_from_config(qcfg)
    except QuantizationError as e:
        raise ModelLoadError(f"GPTQ config: {e}") from None
    quantized, perms, consumed = {}, {}, set()
    for module in sorted(k[: -len(".qweight")] for k in tensors.keys() if k.endswith(".qweight")):
        keys = {k: f"{module}.{k}" for k in gptq_format.TENSOR_NAMES if f"{module}.{k}" in tensors}
        got = tensors.read(keys.values())
        parts = {k: got[v] for k, v in keys.items()}
        try:
            qw, g_idx = gptq_format.unpack(parts, args, module)
            if g_idx is not None:
                qw, perm = actorder.regroup(qw, g_idx, module)
                if perm is not None:
                    perms[module] = perm
        except QuantizationError as e:
            raise ModelLoadError(str(e)) from None
        quantized[module] = qw
        consumed.update(keys.values())
    if not quantized:
        raise ModelLoadError("the checkpoint's config says it is GPTQ-quantized but no qweight tensors were found")
    rest = [k for k in sorted(tensors.keys()) if k not in consumed]
    return QuantizedCheckpoint(
        fmt="gptq",
        bits=args.bits,
        group_size=args.group_size,
        sym=all(qw.sym for qw in quantized.values()),
        fp_tensors=tensors.read(rest),
        quantized=quantized,
        modules_to_not_convert=list(qcfg.get("modules_to_not_convert") or []),
        config=config,
        input_perms=perms,
    )
