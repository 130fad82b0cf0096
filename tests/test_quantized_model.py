"""Quantized checkpoints (both formats) load into QuantLinear models that compute what the
dequantized weights compute."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.models.loader import build_fp_model
from lowbit.quant.loader import load_model
from lowbit.models.registry import resolve_config
from lowbit.models.weights import iter_tensors
from lowbit.quant.checkpoint import save_quantized
from lowbit.quant.primitives import quantize_weight

from conftest import make_tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize_dir(src, dst, fmt, bits, group_size, sym):
    hf = json.loads((src / "config.json").read_text())
    fp, quantized = {}, {}
    for name, t in iter_tensors(src):
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
            quantized[module] = quantize_weight(t.float(), bits, group_size, sym)
        else:
            fp[name] = t
    save_quantized(dst, hf_config=hf, fp_tensors=fp, quantized=quantized, fmt=fmt)
    return hf, fp, quantized


def _reference(hf, fp, quantized):
    """The fp model with every quantized weight replaced by its dequantized value (fp tensors
    rounded the way the format stores them)."""
    tensors = {k: v for k, v in fp.items()}
    for module, qw in quantized.items():
        tensors[f"{module}.weight"] = qw.dequantize()
    return build_fp_model(resolve_config(hf), tensors.items())


@pytest.mark.parametrize(
    "arch,fmt,bits,group_size,sym",
    [
        ("llama", "awq", 4, 32, False),
        ("qwen2", "awq", 4, 64, True),
        ("llama", "compressed-tensors", 4, 32, False),
        ("qwen3", "compressed-tensors", 3, 32, False),
        ("llama", "compressed-tensors", 8, -1, True),
    ],
)
def test_quantized_checkpoint_matches_dequantized(tmp_path, arch, fmt, bits, group_size, sym):
    src, dst = tmp_path / "fp", tmp_path / "q"
    make_tiny_model(arch, src)
    _quantize_dir(src, dst, fmt, bits, group_size, sym)
    loaded = load_model(dst, with_tokenizer=False)
    assert loaded.quantization is not None
    attn = loaded.model.model.layers[0].self_attn
    assert attn.qkv_proj is not None and type(attn.qkv_proj).__name__ == "QuantLinear"
    # reference: dequantize what was actually stored (scales/fp tensors after the format's rounding)
    from lowbit.quant.checkpoint import load_quantized

    ck = load_quantized(dst)
    hf = json.loads((dst / "config.json").read_text())
    ref = _reference(hf, ck.fp_tensors, ck.quantized)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.compute_logits(ref(ids))
        got = loaded.model.compute_logits(loaded.model(ids))
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_quantized_model_is_smaller(tmp_path):
    src, dst = tmp_path / "fp", tmp_path / "q"
    make_tiny_model("llama", src, hidden_size=256, intermediate_size=512)
    _quantize_dir(src, dst, "awq", 4, 64, False)
    q = load_model(dst, with_tokenizer=False).model
    fp = load_model(src, with_tokenizer=False).model

    def linear_bytes(m):
        total = 0
        for layer in m.model.layers:
            for mod in layer.modules():
                if mod is layer or list(mod.children()):
                    continue
                total += sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))
        return total

    assert linear_bytes(q) <= 0.4 * linear_bytes(fp)
