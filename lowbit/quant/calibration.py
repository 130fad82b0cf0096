"""Calibration data for AWQ: texts from a file, a Hugging Face dataset or the shipped C4 sample,
tokenized, concatenated and cut into equal blocks.

Why concatenate and cut: every block is then exactly `seqlen` real tokens (no padding, no mask),
which is what the layer-by-layer search feeds through plain causal attention.

Sources (`source` argument):
  None / "default"  the C4 sample shipped in the package (lowbit/data/calib_c4_sample.jsonl,
                    attribution in lowbit/data/CALIBRATION_DATA.md)
  FILE.jsonl        one JSON object per line, text in the field "text"
  FILE.txt          documents separated by blank lines; a file without any blank line is read
                    as one document per line
  NAME[:CONFIG]     a Hugging Face dataset (split "train", field "text"), streamed; needs the
                    `datasets` package and network access
"""
from __future__ import annotations

import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import LowbitError

DEFAULT_SOURCE = "default"
DEFAULT_RESOURCE = "calib_c4_sample.jsonl"
# AutoAWQ's and llm-awq's defaults, 128 x 512 tokens: they give the per-channel activation
# statistics and the blocks the layers carry; a subset of them drives the grid search (awq.py).
# Measured on the default model (W4 g64, WikiText-2 16 windows): 64 blocks 24.47 / 24.55 (seeds 0/1),
# 128 blocks 23.84 / 23.93, for 200 -> 300 s.
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512
TEXT_FIELD = "text"
_BLANK_LINES = re.compile(r"\n(?:[ \t\r]*\n)+")


class CalibrationError(LowbitError):
    """Calibration source that cannot be read, or too little text in it."""


@dataclass
class CalibrationData:
    """Token blocks [n_samples, seqlen] (int64) and where they came from."""

    input_ids: torch.Tensor
    source: str
    n_documents: int = 0

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.n_samples * self.seqlen


# ----------------------------------------------------------------------------- reading texts


def read_jsonl(path: Path, field: str = TEXT_FIELD) -> list[str]:
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise CalibrationError(f"{path}:{lineno}: expected an object with a string field {field!r}")
                if record[field].strip():
                    texts.append(record[field])
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read calibration file ({e})") from None
    return texts


def read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read calibration file ({e})") from None
    text = text.replace("\r\n", "\n")
    parts = _BLANK_LINES.split(text) if _BLANK_LINES.search(text) else text.split("\n")
    return [p.strip("\n") for p in parts if p.strip()]


def read_default_sample() -> list[str]:
    """The C4 sample shipped inside the package (never read from the shared data folder)."""
    ref = resources.files("lowbit").joinpath("data", DEFAULT_RESOURCE)
    with resources.as_file(ref) as path:
        return read_jsonl(Path(path))


def read_hf_dataset(name: str, n_docs: int, split: str = "train", field: str = TEXT_FIELD) -> list[str]:
    """Stream the first n_docs texts of a Hugging Face dataset (online only)."""
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise CalibrationError(
            f"{name!r} is not a local file, and reading Hugging Face datasets needs the `datasets` package "
            "(pip install datasets) and network access; pass a local .jsonl or .txt file with --calib instead"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise CalibrationError(f"cannot fetch dataset {name!r}: Hugging Face is set offline; pass a local file")
    repo, _, config = name.partition(":")
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, config or None, split=split, streaming=True)
        texts = []
        for row in ds:
            value = row.get(field)
            if isinstance(value, str) and value.strip():
                texts.append(value)
            if len(texts) >= n_docs:
                break
    except Exception as e:  # offline, unknown dataset, no such split...
        raise CalibrationError(
            f"cannot read dataset {name!r} split {split!r} from Hugging Face ({type(e).__name__}); this "
            "machine may be offline: pass a local .jsonl or .txt file instead"
        ) from None
    if not texts:
        raise CalibrationError(f"dataset {name!r} has no non-empty {field!r} texts")
    return texts


def load_texts(source: str | os.PathLike | None, max_docs: int = 100_000) -> tuple[list[str], str]:
    """Resolve a calibration source to (texts, description)."""
    if source is None or str(source) == DEFAULT_SOURCE:
        return read_default_sample(), f"lowbit/data/{DEFAULT_RESOURCE} (C4 sample)"
    path = Path(source).expanduser()
    if path.is_dir():
        raise CalibrationError(f"{path}: is a directory; expected a .jsonl or .txt calibration file")
    if path.exists():
        if path.suffix == ".jsonl":
            texts = read_jsonl(path)
        elif path.suffix in (".txt", ".raw", ".text"):
            texts = read_txt(path)
        else:
            raise CalibrationError(f"{path}: unknown calibration file type {path.suffix!r} (use .jsonl or .txt)")
        if not texts:
            raise CalibrationError(f"{path}: contains no text")
        return texts, str(path)
    if path.suffix in (".jsonl", ".txt", ".json") or str(source).startswith((".", "/", "~")):
        raise CalibrationError(f"{path}: no such calibration file")
    return read_hf_dataset(str(source), max_docs), f"hf:{source}"


# ----------------------------------------------------------------------------- blocks


def blocks_from_ids(ids: Sequence[int] | torch.Tensor, n_samples: int, seqlen: int) -> torch.Tensor:
    """Cut a token stream into at most n_samples blocks of seqlen tokens ([n, seqlen] int64)."""
    check_shape(n_samples, seqlen)
    flat = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    n = min(n_samples, flat.numel() // seqlen)
    if n == 0:
        raise CalibrationError(
            f"calibration data has {flat.numel()} tokens, fewer than one block of {seqlen}; "
            "use more text or a smaller --calib-seqlen"
        )
    if n < n_samples:
        warnings.warn(f"calibration data gives only {n} blocks of {seqlen} tokens (asked for {n_samples})", stacklevel=2)
    return flat[: n * seqlen].reshape(n, seqlen).clone()


def check_shape(n_samples: int, seqlen: int) -> None:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise CalibrationError(f"calibration samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise CalibrationError(f"calibration sequence length must be an integer >= 2, got {seqlen!r}")


def tokenize_documents(texts: list[str], tokenizer: Any, n_tokens: int, seed: int = 0) -> tuple[list[int], int]:
    """Tokenize documents in a seeded random order until n_tokens are collected.

    Documents are joined with the tokenizer's EOS token (when it has one) so the model sees the
    document boundaries it was trained with. Returns (token ids, documents used).
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    used = 0
    for i in order:
        doc = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if not doc:
            continue
        if ids and isinstance(eos, int):
            ids.append(eos)
        ids.extend(doc)
        used += 1
        if len(ids) >= n_tokens:
            break
    return ids, used


def build_calibration(
    source: str | os.PathLike | None,
    tokenizer: Any,
    n_samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
) -> CalibrationData:
    """Texts from `source` -> CalibrationData with n_samples blocks of seqlen tokens."""
    check_shape(n_samples, seqlen)
    if tokenizer is None:
        raise CalibrationError("this model has no tokenizer; calibration from text needs one (pass token ids instead)")
    texts, desc = load_texts(source, max_docs=max(64, n_samples * 8))
    ids, used = tokenize_documents(texts, tokenizer, n_samples * seqlen, seed)
    return CalibrationData(blocks_from_ids(ids, n_samples, seqlen), desc, used)


def calibration_from_ids(ids: Sequence[int] | torch.Tensor, n_samples: int, seqlen: int) -> CalibrationData:
    """For models without a tokenizer (tests, pre-tokenized data): a token stream or [n, T] blocks."""
    t = torch.as_tensor(ids, dtype=torch.int64)
    if t.dim() == 2 and t.shape[1] == seqlen:
        return CalibrationData(t[:n_samples].clone(), "token ids", 0)
    return CalibrationData(blocks_from_ids(t, n_samples, seqlen), "token ids", 0)
