"""Our decoder must reproduce transformers' logits for every supported architecture."""
from __future__ import annotations

import json

import pytest
import torch

from lowbit.errors import ModelLoadError, UnsupportedArchitectureError
from lowbit.layers.rotary import RopeConfig, RotaryEmbedding
from lowbit.models.registry import supported_architectures
from lowbit.models.transformer import CausalLM, rotary_for
from lowbit.quant.loader import load_model

from conftest import make_tiny_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"num_key_value_heads": 4}),
        ("llama3", {}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {}),
        ("qwen3", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    ],
)
def test_logits_match_transformers(tmp_path, arch, overrides):
    ref = make_tiny_model(arch, tmp_path, **overrides)
    ours = load_model(tmp_path, with_tokenizer=False).model
    ids = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours.compute_logits(ours(ids))
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4


def test_fused_projections_same_logits(tmp_path):
    make_tiny_model("qwen2", tmp_path)
    m = load_model(tmp_path, with_tokenizer=False).model
    ids = torch.randint(0, 256, (1, 33))
    with torch.no_grad():
        a = m.compute_logits(m(ids))
        m.fuse_projections()
        assert m.model.layers[0].self_attn.qkv_proj is not None
        b = m.compute_logits(m(ids))
    assert rel_err(b, a) < 1e-5


def test_supported_list_has_the_four_families():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(
        supported_architectures()
    )


def test_unknown_architecture_is_named(tmp_path):
    make_tiny_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        load_model(tmp_path, with_tokenizer=False)


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope", with_tokenizer=False)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, with_tokenizer=False)


def test_truncated_safetensors(tmp_path):
    make_tiny_model("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path, with_tokenizer=False)


def test_pickle_checkpoint_refused(tmp_path):
    make_tiny_model("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(tmp_path, with_tokenizer=False)


def test_one_rotary_construction(tmp_path):
    """Every model gets its rotary table from `rotary_for`, real (CPU) even when the model is
    built on the meta device, and equal to a table built directly; no other code builds one."""
    from pathlib import Path

    make_tiny_model("llama3", tmp_path)
    cfg = load_model(tmp_path, with_tokenizer=False).config
    assert cfg.rope.type == "llama3"
    with torch.device("meta"):
        model = CausalLM(cfg)
    direct = RotaryEmbedding(cfg.head_dim, min(cfg.max_position_embeddings, 4096), cfg.rope)
    assert model.rotary.cos_sin.device.type == "cpu" and torch.equal(model.rotary.cos_sin, direct.cos_sin)
    assert torch.equal(rotary_for(cfg).inv_freq, direct.inv_freq)
    assert not torch.equal(direct.inv_freq, RotaryEmbedding(cfg.head_dim, 8, RopeConfig(cfg.rope.theta)).inv_freq)
    src = Path(__file__).resolve().parents[1] / "lowbit"
    builders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "RotaryEmbedding(" in p.read_text())
    assert builders == ["layers/rotary.py", "models/transformer.py"]  # the class itself, and rotary_for
