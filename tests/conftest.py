"""Shared fixtures: tiny random-weight checkpoints of each architecture, built with transformers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype auto means bfloat16 matrix work on CPUs with native bf16 (lowbit/engine/args.py); the suite's
# exactness checks compare against fp32 references, so auto means float32 here (subprocesses
# included), and tests/test_bf16.py asks for bfloat16 explicitly.
os.environ.setdefault("LOWBIT_DTYPE", "float32")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def tiny_hf_config(arch: str, **overrides):
    import transformers as tf

    kw = {**TINY, **overrides}
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return tf.LlamaConfig(rope_scaling=rope, **kw)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **kw)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=32, **kw)
    raise ValueError(arch)


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, **overrides):
    """Save a random-weight transformers model (safetensors) and return it."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # biases default to zero in some inits: make them visible to the comparison
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct) as an HF dir; fetched once into the cache."""
    from lowbit.models.default import ensure_default_model

    return ensure_default_model()


# ----------------------------------------------------------------------------- kernel variants
def use_kernels(monkeypatch, isa: str) -> None:
    """Forces the kernel registry to `isa` (a compiled variant, or "ref") for the rest of a test;
    skips a variant this machine cannot run (CPU lacks it, or the install did not build it)."""
    from lowbit import kernels

    if isa != "ref" and isa not in kernels.usable_variants():
        pytest.skip(f"the {isa} kernels do not run here (CPU or build; see `lowbit env`)")
    monkeypatch.delenv("LOWBIT_NO_EXT", raising=False)
    monkeypatch.setenv("LOWBIT_ISA", isa)
    kernels.reset()


def _variant_names() -> list[str]:
    from lowbit.kernels.variants import VARIANTS

    return [v.name for v in VARIANTS]


@pytest.fixture(params=_variant_names())
def isa(request, monkeypatch):
    """Runs a test once per compiled kernel variant (avx512, avx2); those this machine cannot run skip."""
    from lowbit import kernels

    use_kernels(monkeypatch, request.param)
    yield request.param
    kernels.reset()  # the next use re-reads the environment monkeypatch restores


@pytest.fixture(params=[*_variant_names(), "ref"])
def kernel_impl(request, monkeypatch):
    """Like `isa`, plus the pure-torch reference ("ref"), so one test checks every implementation."""
    from lowbit import kernels

    use_kernels(monkeypatch, request.param)
    yield request.param
    kernels.reset()
