"""Load an AutoGPTQ / GPTQModel checkpoint into the canonical QuantizedCheckpoint.

Tensor decoding lives in formats/gptq.py; act-order (desc_act) weights are regrouped into
lowbit's group-contiguous layout by formats/actorder.py, their permutations handed on in
QuantizedCheckpoint.input_perms for the model builder to fold or apply (see actorder.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from lowbit.errors import ModelLoadError, QuantizationError
from lowbit.quant.formats import actorder
from lowbit.quant.formats import gptq as gptq_format


def load_gptq(qcfg: dict, config: dict, get: Callable[[str], torch.Tensor], where: Mapping[str, object]):
    """qcfg: the GPTQ quantization config; get(key) reads one tensor; where: every tensor name."""
    from lowbit.quant.checkpoint import QuantizedCheckpoint

    try:
        args = gptq_format.args_from_config(qcfg)
    except QuantizationError as e:
        raise ModelLoadError(f"GPTQ config: {e}") from None
    quantized, perms, consumed = {}, {}, set()
    for module in sorted(k[: -len(".qweight")] for k in where if k.endswith(".qweight")):
        keys = {k: f"{module}.{k}" for k in gptq_format.TENSOR_NAMES if f"{module}.{k}" in where}
        parts = {k: get(v) for k, v in keys.items()}
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
    return QuantizedCheckpoint(
        fmt="gptq",
        bits=args.bits,
        group_size=args.group_size,
        sym=all(qw.sym for qw in quantized.values()),
        fp_tensors={k: get(k) for k in sorted(where) if k not in consumed},
        quantized=quantized,
        modules_to_not_convert=list(qcfg.get("modules_to_not_convert") or []),
        config=config,
        input_perms=perms,
    )
