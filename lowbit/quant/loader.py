"""Load any model the toolkit supports: fp checkpoints, and quantized ones (AutoAWQ GEMM,
compressed-tensors or AutoGPTQ / GPTQModel) whose linears become QuantLinear modules (wrapped in
InputPermuted where an act-order permutation could not be folded into the previous layer).

Why here and not in models/: a quantized checkpoint needs the quant formats, which sit above the
models, so the loader that knows every kind of checkpoint sits at this level; models/loader.py
keeps what needs no quantization (resolving a model name, reading config and tokenizer, building
an fp model).

Quantized linears' kernels repack the weights at load; q/k/v and gate/up are fused here, at the
QuantizedWeight level, so each layer runs two low-bit matmuls fewer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..distributed.group import TPGroup
from ..errors import ModelLoadError
from ..layers.linear import QuantLinear
from ..layers.linear_int8 import W8A8Linear
from ..layers.permuted import InputPermuted
from ..layers.qweight import QuantizedWeight
from ..models.config import ModelConfig
from ..models.loader import LoadedModel, build_fp_model, load_tokenizer, read_hf_config, resolve_model_dir
from ..models.loader_utils import replace_module
from ..models.registry import resolve_config
from ..models.tp import plan_for, shard_model, shard_quantized
from ..models.transformer import CausalLM
from ..models.weights import iter_tensors
from .checkpoint import load_quantized
from .checkpoint.load import LEGACY_CONFIG_FILES
from .formats.actorder import fold_into_previous

FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def concat_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack along the output dimension; None when the parts were quantized differently."""
    a = parts[0]
    if any((p.bits, p.group_size, p.sym, p.in_features) != (a.bits, a.group_size, a.sym, a.in_features) for p in parts):
        return None
    return QuantizedWeight(
        q=torch.cat([p.q for p in parts]), scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]), bits=a.bits, group_size=a.group_size, sym=a.sym,
    )


def _bias(fp: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    b = fp.pop(f"{name}.bias", None)
    return None if b is None else b.float()


def _same_perm(perms: list[torch.Tensor | None]) -> bool:
    """Fused parts must read their input in one order (q/k/v of act-order GPTQ share H, so do)."""
    return all(p is None for p in perms) or (
        all(p is not None for p in perms) and all(torch.equal(p, perms[0]) for p in perms[1:]))


def _permuted(module: QuantLinear, perm: torch.Tensor | None) -> QuantLinear | InputPermuted:
    return module if perm is None else InputPermuted(module, perm)


def build_quantized_model(cfg: ModelConfig, model_dir: Path, tp: TPGroup | None = None) -> CausalLM:
    """tp: build only this tensor-parallel rank's slice (cut before fusing and packing)."""
    ckpt = load_quantized(model_dir)
    # W8A8 checkpoints (int8 activations too) get the int8 GEMM layer; the rest the weight-only one
    linear = W8A8Linear.from_quantized if ckpt.activations == "int8" else QuantLinear.from_quantized
    fp = dict(ckpt.fp_tensors)
    quantized = dict(ckpt.quantized)
    # act-order checkpoints: down_proj's permutation folds into gate/up rows, the rest gather x
    perms = fold_into_previous(quantized, fp, ckpt.input_perms) if ckpt.input_perms else {}
    plan = None
    if tp is not None and tp.world > 1:
        down = quantized.get("model.layers.0.mlp.down_proj")
        plan = plan_for(cfg, tp.rank, tp.world, None if down is None else down.group_size)
        shard_quantized(quantized, fp, perms, plan)
    with torch.device("meta"):
        model = CausalLM(cfg)

    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            names = [prefix + fused.split(".")[0] + "." + p for p in parts]
            if all(n in quantized for n in names) and _same_perm([perms.get(n) for n in names]):
                merged = concat_quantized([quantized[n] for n in names])
                if merged is not None:
                    biases = [_bias(fp, n) for n in names]
                    bias = torch.cat(biases) if all(b is not None for b in biases) else None
                    for n in names:
                        del quantized[n]
                    replace_module(model, prefix + fused, _permuted(linear(merged, bias), perms.get(names[0])))
                    for n in names:
                        replace_module(model, n, None)
    for name, qw in quantized.items():
        replace_module(model, name, _permuted(linear(qw, _bias(fp, name)), perms.get(name)))

    state = {k: v.float() for k, v in fp.items()}
    expected = {k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelLoadError(f"{model_dir}: quantized checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    model.tie_weights()
    model.requires_grad_(False)
    if plan is not None:
        shard_model(model, plan, tp)
    return model.eval()


def _legacy_quant_config(model_dir: Path) -> dict[str, Any] | None:
    """quantize_config.json / quant_config.json of a checkpoint whose config.json has none."""
    for name in LEGACY_CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{path}: unreadable quantization config ({e})") from None
    return None


def load_model(spec: str | os.PathLike | None = None, *, with_tokenizer: bool = True,
               tp: TPGroup | None = None) -> LoadedModel:
    """A model directory, .gguf file, hub id or the default alias -> a loaded CausalLM (quantized
    when its config.json has a quantization_config, or a legacy quantize_config.json / quant_config.json
    lies beside it), with its tokenizer unless told otherwise."""
    model_dir = resolve_model_dir(spec)
    hf = read_hf_config(model_dir)
    cfg = resolve_config(hf)
    qcfg = hf.get("quantization_config") or _legacy_quant_config(model_dir)
    if qcfg:
        model = build_quantized_model(cfg, model_dir, tp)
    else:
        model = build_fp_model(cfg, iter_tensors(model_dir))
        if tp is not None and tp.world > 1:
            shard_model(model, plan_for(cfg, tp.rank, tp.world), tp)
    tok = load_tokenizer(model_dir) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tok, config=cfg, path=model_dir, quantization=qcfg,
                       shard=getattr(model, "tp_plan", None))
