"""The real default model: our logits vs transformers', and the CLI on it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_default_model_logits_match_transformers(default_model_dir, shared_data):
    from transformers import AutoModelForCausalLM

    from lowbit.quant.loader import load_model

    lm = load_model(default_model_dir)
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text()[:2000]
    ids = torch.tensor([lm.tokenizer(text)["input_ids"][:64]])
    assert ids.shape[1] == 64
    ref = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
        got = lm.model.compute_logits(lm.model(ids))
    err = float((got - want).abs().max() / want.abs().max())
    print(f"default model: max|dlogit|/max|logit| = {err:.3e}")
    assert err < 1e-4


def _lowbit(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_cli_greedy(default_model_dir):
    r = _lowbit("generate", "--model", str(default_model_dir), "--prompt", "What is the capital of France?",
                "--chat", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
