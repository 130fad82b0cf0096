"""Exactness on a second real architecture: Qwen2.5-Coder-0.5B-Instruct (Qwen2), imported from its Q4_K_M GGUF.

Slow, and skipped unless the model is in the cache (`python benchmarks/models.py fetch qwen2.5-coder-0.5b`):
  * our Qwen2 decoder against transformers' Qwen2ForCausalLM on the imported directory, fp32, on a
    64-token WikiText-2 prompt: max|delta logit| / max|logit| < 1e-5;
  * our GGUF import against transformers' own GGUF loader (`from_pretrained(gguf_file=...)`): the same
    tensor names, shapes and bit-identical values (both dequantize with the gguf package's numpy code,
    so any difference is a naming, orientation or layout bug on one side).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import models as real_models  # noqa: E402
from test_model_exact import rel_err  # noqa: E402

NAME = "qwen2.5-coder-0.5b"
PROMPT_TOKENS = 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    d = real_models.cached_dir(NAME)
    if d is None:
        pytest.skip(f"{NAME} is not fetched; run: {real_models.fetch_command(NAME)}")
    return d


@pytest.fixture(scope="module")
def wikitext_ids(qwen_dir, shared_data) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(qwen_dir)(text[:4000], return_tensors="pt").input_ids
    assert ids.shape[1] >= PROMPT_TOKENS
    return ids[:, :PROMPT_TOKENS]


def test_qwen2_decoder_matches_transformers(qwen_dir, wikitext_ids):
    import transformers

    from lowbit.quant.loader import load_model

    ours = load_model(qwen_dir, with_tokenizer=False).model
    with torch.no_grad():
        got = ours.compute_logits(ours(wikitext_ids))
    del ours
    ref = transformers.Qwen2ForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(wikitext_ids).logits
    assert got.shape == want.shape == (1, PROMPT_TOKENS, 151936)
    err = rel_err(got, want)
    print(f"\n{NAME}: max|dlogit| / max|logit| = {err:.3g} (max|logit| {want.abs().max():.2f})")
    assert err < 1e-5, err
    # the same next-token picks: a sanity check that the logits are a language model's, not noise
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_gguf_import_matches_transformers_gguf_loader(qwen_dir):
    import transformers
    from safetensors.torch import load_file

    gguf = real_models.gguf_path(real_models.get(NAME))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    ours = load_file(str(qwen_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 291  # the GGUF's 291 tensors, one HF tensor each (lm_head is stored, not tied)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.float32, name
        assert t.shape == theirs[name].shape, name
        assert torch.equal(t, theirs[name]), f"{name}: max|delta| {(t - theirs[name]).abs().max()}"
