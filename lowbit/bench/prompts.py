"""Seeded random token-id prompts for benchmarks (standard library only, stable across versions)."""
from __future__ import annotations

import json
import random
from pathlib import Path

FIRST_ID = 32  # skip the low ids where Llama-style vocabularies keep their special tokens


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(f"lowbit-bench|{seed}|{input_len}|{vocab_size}|{FIRST_ID}")
    return [[rng.randrange(FIRST_ID, vocab_size) for _ in range(input_len)] for _ in range(num)]


def load_prompts(path: str | Path) -> list[list[int]]:
    """A JSON list of token-id lists (what the peer comparison scripts hand to every engine)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(p, list) and p for p in data):
        raise ValueError(f"{path}: expected a JSON list of non-empty token-id lists")
    return data
