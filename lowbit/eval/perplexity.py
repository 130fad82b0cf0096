"""Perplexity with the protocol of the AWQ / GPTQ / Hugging Face evaluations.

The whole evaluation text is joined into one stream and tokenized once; the stream is cut into
non-overlapping windows of `seqlen` tokens (the last partial window is dropped); each window is
scored on its own (no context carried over) and every predicted token of it counts:
ppl = exp(mean negative log-likelihood over all windows' predicted tokens).

WikiText-2: those evaluations join the Hugging Face rows with "\\n\\n". A row is one line of the
raw file with its newline kept, and blank lines (" \\n" in the raw file) are empty rows, so
`hf_rows` rebuilds the rows from wiki.test.raw and the joined text is byte-identical to theirs.
Any other .txt file is read the same way (one row per line); a .jsonl file's "text" fields are
joined with "\\n\\n".
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LowbitError

DEFAULT_SEQLEN = 2048
LOGIT_ROWS = 512  # logits are computed this many positions at a time ([rows, vocab] fp32)
HF_DEFAULT = ("wikitext", "wikitext-2-raw-v1", "test")


class EvalError(LowbitError):
    """Evaluation data that cannot be read or is too short."""


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # predicted tokens scored
    n_windows: int
    seqlen: int
    seconds: float
    dataset: str = ""
    model: str = ""


# ----------------------------------------------------------------------------- text


def hf_rows(raw: str) -> list[str]:
    """Lines of a WikiText raw file as the Hugging Face dataset rows (newline kept, blank = "")."""
    rows = raw.splitlines(keepends=True)
    return ["" if not r.strip() else r for r in rows]


def read_eval_text(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"{p}: no such evaluation file")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{p}: cannot read evaluation text ({e})") from None
    if p.suffix == ".jsonl":
        import json

        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise EvalError(f"{p}:{lineno}: expected a JSON object with a \"text\" field") from None
        return "\n\n".join(texts)
    return "\n\n".join(hf_rows(raw))


def default_eval_text() -> tuple[str, str]:
    """WikiText-2 raw test from the Hugging Face hub (needs `datasets` and network)."""
    name, config, split = HF_DEFAULT
    hint = "pass --dataset FILE (e.g. a local copy of wikitext-2-raw/wiki.test.raw)"
    try:
        from datasets import load_dataset
    except ImportError:
        raise EvalError(f"no evaluation text given and the `datasets` package is not installed; {hint}") from None
    try:
        rows = load_dataset(name, config, split=split)["text"]
    except Exception as e:  # offline, hub error
        raise EvalError(f"cannot fetch {name}/{config} from Hugging Face ({type(e).__name__}); {hint}") from None
    return "\n\n".join(rows), f"hf:{name}/{config}:{split}"


def tokenize_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text tokenized once, as the reference evaluations do (tokenizer defaults).

    encode(), the same ids as tokenizer(text).input_ids: lowbit's FastTokenizer answers it from
    the tokenizers library directly, without transformers' "sequence length is longer than the
    maximum" warning, which is harmless here (the ids are cut into windows next)."""
    if tokenizer is None:
        raise EvalError("this model has no tokenizer; perplexity on text needs one")
    return torch.tensor(tokenizer.encode(text), dtype=torch.int64)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t) over one window, and the number of predictions."""
    hidden = model(ids.view(1, -1))[0]  # [T, H]
    targets = ids[1:]
    total = 0.0
    for start in range(0, targets.numel(), LOGIT_ROWS):
        h = hidden[start : min(start + LOGIT_ROWS, targets.numel())]
        logits = model.compute_logits(h).float()
        total += float(F.cross_entropy(logits, targets[start : start + h.shape[0]], reduction="sum").double())
    return total, int(targets.numel())


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    progress: bool = False,
    desc: str = "ppl",
) -> PerplexityResult:
    """Perplexity of a CausalLM (fp or quantized) over a token stream."""
    if not isinstance(seqlen, int) or seqlen < 2:
        raise EvalError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and max_windows < 1:
        raise EvalError(f"max windows must be a positive integer, got {max_windows!r}")
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise EvalError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    t0 = time.perf_counter()
    total, count = 0.0, 0
    windows = range(n)
    if progress:
        from tqdm import tqdm

        windows = tqdm(windows, desc=desc, unit="window", dynamic_ncols=True)
    for w in windows:
        s, c = window_nll(model, ids[w * seqlen : (w + 1) * seqlen])
        total += s
        count += c
    nll = total / count
    return PerplexityResult(
        ppl=math.exp(nll) if nll < 700 else math.inf, nll=nll, n_tokens=count, n_windows=n, seqlen=seqlen,
        seconds=time.perf_counter() - t0,
    )


class _RankedModel:
    """What `window_nll` calls on a model, run over tensor-parallel ranks: each window is one fresh
    prefill through the engine's ModelRunner (rank 0 computes the logits)."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runner.forward_window(ids.reshape(-1).tolist()).unsqueeze(0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner.model.compute_logits(hidden)


def evaluate_ppl(
    model_spec: str | os.PathLike | None,
    dataset: str | os.PathLike | None = None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    progress: bool = True,
    tensor_parallel_size: int = 1,
    dtype: str = "float32",
    **parallel,
) -> PerplexityResult:
    """Load a model (fp or quantized checkpoint) and measure its perplexity on `dataset`.
    tensor_parallel_size > 1 (with the engine's nnodes / master_* options): over that many ranks.
    dtype: the matrix multiplies' (EngineArgs.dtype); float32 by default, the reference every
    quantization figure is measured against."""
    from ..models.loader import resolve_model_dir
    from ..quant.loader import load_model

    model_dir = resolve_model_dir(model_spec)  # a bad model path is reported before anything else
    text, desc = (read_eval_text(dataset), str(dataset)) if dataset is not None else default_eval_text()
    label = str(model_spec) if model_spec is not None else "default"
    with contextlib.ExitStack() as stack:
        if tensor_parallel_size > 1:
            from ..engine.model_runner import ModelRunner

            runner = ModelRunner(ppl_engine_args(model_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                                 **parallel))
            stack.callback(runner.close)
            if runner.tokenizer is None:
                raise EvalError(f"{model_dir} has no tokenizer files")
            model, tokenizer, path = _RankedModel(runner), runner.tokenizer, model_dir
        else:
            from ..engine.args import resolve_dtype

            bf16 = resolve_dtype(dtype) == "bfloat16"  # a bad name fails here, before the model loads
            lm = load_model(model_dir)
            if bf16:
                from ..layers.linear_bf16 import use_bf16

                use_bf16(lm.model)
            model, tokenizer, path = lm.model, lm.tokenizer, lm.path
        ids = tokenize_stream(tokenizer, text)
        res = perplexity(model, ids, seqlen, max_windows, progress=progress, desc=Path(label).name or label)
    res.dataset, res.model = desc, str(path)
    return res


def ppl_engine_args(model: str | os.PathLike | None, **parallel):
    """The engine settings `eval ppl -tp N` runs with (a worker node of a multi-node run builds its
    ranks from these too): windows score every row in chunks on rank 0 alone, so the LM head is
    replicated (no per-chunk gather)."""
    from ..engine.args import EngineArgs

    return EngineArgs(model=None if model is None else str(model), vocab_parallel_head=False, **parallel)
