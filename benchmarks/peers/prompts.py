"""Shared benchmark prompts: seeded random token-id lists, identical in every engine's process.

Every peer runner (llama.cpp, vLLM, transformers) and lowbit's own benchmark import THIS module, so
the workloads are the same token ids, not merely the same lengths. Pure standard library (random,
hashlib): no numpy/torch, so it imports in any venv and its output never depends on their versions.
`random.Random(seed)` with `randrange` is stable across CPython releases.

Prompts are raw token ids fed as-is: no BOS is added by any engine (vLLM TokensPrompt,
llama-cpp-python's `generate(tokens)`, transformers' `input_ids` all take them verbatim).

Usage:
    from prompts import make_prompts, decode_prompt, fingerprint
    prompts = make_prompts(num_prompts=64, input_len=128, vocab_size=49152)   # seed 0
    ids = decode_prompt(vocab_size=49152)                                    # the batch-1 prompt
    fingerprint(prompts)  # short sha256, put in every result so mismatched workloads show

Special tokens: ids are drawn from [first_id, vocab_size). The default first_id=FIRST_ID skips the
low ids where SmolLM2/Llama-style vocabularies keep their special tokens (SmolLM2: 0..16). Pass the
SAME vocab_size and first_id in every engine (the tokenizer's real vocabulary size: 49152 for
SmolLM2-135M in both its GGUF and its HF config).
"""
from __future__ import annotations

import hashlib
import json
import random

DEFAULT_SEED = 0
DECODE_SEED = 1234
DECODE_INPUT_LEN = 32
FIRST_ID = 32


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = DEFAULT_SEED,
                 first_id: int = FIRST_ID) -> list[list[int]]:
    """`num_prompts` lists of `input_len` token ids, uniform in [first_id, vocab_size), seeded."""
    if num_prompts < 0 or input_len < 1:
        raise ValueError("num_prompts must be >= 0 and input_len >= 1")
    if not 0 <= first_id < vocab_size:
        raise ValueError(f"need 0 <= first_id ({first_id}) < vocab_size ({vocab_size})")
    # num_prompts is not in the seed: make_prompts(8, ...) == make_prompts(64, ...)[:8].
    rng = random.Random(f"lowbit-bench|{seed}|{input_len}|{vocab_size}|{first_id}")
    return [[rng.randrange(first_id, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def run_prompts(num_prompts: int, input_len: int, vocab_size: int, run: int) -> list[list[int]]:
    """The prompts of throughput run `run` (0, 1, ...): a new set per run, so an engine with a
    prefix cache gains nothing from having seen the previous run. Run 0 is make_prompts' default."""
    return make_prompts(num_prompts, input_len, vocab_size, seed=DEFAULT_SEED + run)


def warmup_prompts(num_prompts: int, input_len: int, vocab_size: int) -> list[list[int]]:
    """Prompts for a warm-up that share no prefix with any measured run."""
    return make_prompts(num_prompts, input_len, vocab_size, seed=DEFAULT_SEED + 10_000)


def decode_prompt(vocab_size: int, input_len: int = DECODE_INPUT_LEN, seed: int = DECODE_SEED,
                  first_id: int = FIRST_ID) -> list[int]:
    """The fixed batch-1 prompt of the decode benchmark."""
    return make_prompts(1, input_len, vocab_size, seed=seed, first_id=first_id)[0]


def prompt_vocab_size(model_dir, first_id: int = FIRST_ID) -> int:
    """The id range [first_id, n) every engine accepts as ordinary tokens, from the HF directory's files.

    config.json's vocab_size counts the embedding rows, which can run past the tokenizer: Qwen2.5 has
    151,936 rows but ordinary tokens only below 151,643, then its special tokens, then padding rows that
    no tokenizer knows (vLLM rejects such ids). So n is the lowest id of an added (special) token at or
    above first_id, capped by vocab_size; for SmolLM2 (specials at 0..16) it is 49152, as before.
    """
    from pathlib import Path

    d = Path(model_dir)
    n = int(json.loads((d / "config.json").read_text())["vocab_size"])
    tok = d / "tokenizer.json"
    if tok.exists():
        added = [int(t["id"]) for t in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens", [])]
        n = min([n] + [i for i in added if i >= first_id])
    return n


def fingerprint(prompts) -> str:
    """sha256 (first 16 hex digits) of the token ids: equal workloads have equal fingerprints."""
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    blob = json.dumps([list(map(int, p)) for p in prompts], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


if __name__ == "__main__":  # python benchmarks/peers/prompts.py 49152 -> the fingerprints of the defaults
    import sys

    v = int(sys.argv[1]) if len(sys.argv) > 1 else 49152
    print(json.dumps({"vocab_size": v,
                      "decode_prompt": fingerprint(decode_prompt(v)),
                      "throughput_64x128": fingerprint(make_prompts(64, 128, v))}))
