"""lowbit's FastTokenizer (tokenizers library, no transformers import at start-up) gives what transformers'
tokenizer gives for every call the engine makes, and files it cannot vouch for go to transformers."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from lowbit.models.loader import load_tokenizer
from lowbit.models.tokenizer import FastTokenizer, fast_tokenizer_or_none

ROOT = Path(__file__).resolve().parents[1]
EDGE = [
    "", " ", "hi", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n",
    "<|im_start|>user\nhi<|im_end|>\n", "<|im_end|><|im_end|>x<|endoftext|>", "ünïcödé façade naïve",
    "日本語のテキストと中文", "emoji 🤖🦙👩‍👩‍👧 done", "def f(x):\n    return x ** 2  # comment\n",
    "1234567890 3.14159 -42", "a" * 300, "   \u00a0\u2003 odd spaces", "@@@ ### $$$ %%% ^^^",
]


def _texts(n_wiki: int = 200) -> list[str]:
    wiki = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
    lines = [l for l in wiki.read_text(encoding="utf-8").splitlines() if l.strip()][:n_wiki] if wiki.exists() else []
    return EDGE + lines


def _hf(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def assert_same(fast: FastTokenizer, hf, texts: list[str]) -> None:
    assert isinstance(fast, FastTokenizer)
    assert len(fast) == len(hf)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "eos_token"):
        assert getattr(fast, key) == getattr(hf, key), key
    rng = random.Random(0)
    for text in texts:
        for special in (True, False):
            ids = fast.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), text
        assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        # the engine decodes growing windows of a sequence, often cutting a multi-byte character
        cuts = [ids] + [ids[rng.randrange(len(ids) + 1):][: rng.randrange(1, 6)] for _ in range(3)] if ids else [ids]
        for part in cuts:
            for skip in (True, False):
                assert fast.decode(part, skip_special_tokens=skip) == hf.decode(part, skip_special_tokens=skip)
    assert fast("x y", add_special_tokens=False)["input_ids"] == hf("x y", add_special_tokens=False)["input_ids"]


def _trained_tokenizer(out: Path, **config_overrides) -> Path:
    """A real byte-level BPE (trained here on EDGE) saved by transformers, as a hub model's would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(EDGE * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out)
    if config_overrides:
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(config_overrides)
        cfg_path.write_text(json.dumps(cfg))
    return out


def test_trained_tokenizer_matches_transformers(tmp_path):
    d = _trained_tokenizer(tmp_path)
    fast, hf = load_tokenizer(d), _hf(d)
    assert_same(fast, hf, EDGE)
    msgs = [{"role": "user", "content": "hi"}]
    assert fast.chat_template == hf.chat_template
    assert fast.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_default_model_tokenizer_matches_transformers(default_model_dir):
    assert_same(load_tokenizer(default_model_dir), _hf(default_model_dir), _texts())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_tokenizers_match_transformers(name):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import models as M

    d = M.cached_dir(name)
    if d is None:
        pytest.skip(f"{name} not fetched (python benchmarks/models.py fetch {name})")
    assert_same(load_tokenizer(d), _hf(d), _texts())


@pytest.mark.parametrize("change", [
    {"add_bos_token": True},  # transformers rewrites the post-processor
    {"clean_up_tokenization_spaces": True},
    {"eos_token": "<|not-in-tokenizer-json|>"},  # transformers adds it to the backend
    {"tokenizer_class": "LlamaTokenizer"},
    {"some_future_option": 1},
])
def test_files_fast_path_cannot_vouch_for_go_to_transformers(tmp_path, change):
    d = _trained_tokenizer(tmp_path, **change)
    assert fast_tokenizer_or_none(d) is None
    assert not isinstance(load_tokenizer(d), FastTokenizer)


def test_mistral_family_goes_to_transformers(tmp_path):
    d = _trained_tokenizer(tmp_path)
    assert fast_tokenizer_or_none(d) is not None
    (d / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert fast_tokenizer_or_none(d) is None


def test_generate_start_up_does_not_import_transformers(default_model_dir):
    """The point of FastTokenizer: `lowbit generate` reaches its first token without transformers."""
    import subprocess

    code = ("import sys; sys.argv = ['lowbit', 'generate', '--prompt', 'hi', '--max-tokens', '2']\n"
            "from lowbit.cli import main; main()\n"
            "print('TRANSFORMERS' if 'transformers' in sys.modules else 'LEAN')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LEAN")
