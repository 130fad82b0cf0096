"""Perplexity of several checkpoints on the same text: one table, optionally a bar chart."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import LowbitError
from .perplexity import (
    DEFAULT_SEQLEN,
    PerplexityResult,
    default_eval_text,
    perplexity,
    read_eval_text,
    tokenize_stream,
)


@dataclass
class CompareRow:
    label: str
    result: PerplexityResult
    quantization: str  # e.g. "awq W4 g64", or "fp"


def describe_quantization(qcfg: dict | None) -> str:
    if not qcfg:
        return "fp"
    method = str(qcfg.get("quant_method", "?"))
    if method == "awq":
        return f"awq W{qcfg.get('bits', qcfg.get('w_bit', '?'))} g{qcfg.get('group_size', qcfg.get('q_group_size', '?'))}"
    groups = qcfg.get("config_groups") or {}
    w = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
    g = w.get("group_size") or "ch"
    return f"{method} W{w.get('num_bits', '?')} g{g}{' sym' if w.get('symmetric') else ''}"


def compare_models(
    models: list[str],
    labels: list[str] | None = None,
    dataset: str | os.PathLike | None = None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    progress: bool = True,
) -> list[CompareRow]:
    """Evaluate each model in turn (one in memory at a time) on the same text."""
    from ..models.loader import resolve_model_dir
    from ..quant.loader import load_model

    if not models:
        raise LowbitError("give at least one model to compare")
    if labels is not None and len(labels) != len(models):
        raise LowbitError(f"got {len(labels)} labels for {len(models)} models; give one label per model")
    dirs = [resolve_model_dir(m) for m in models]  # every path is checked before the long evaluations
    text, desc = (read_eval_text(dataset), str(dataset)) if dataset is not None else default_eval_text()
    rows: list[CompareRow] = []
    for i, (spec, model_dir) in enumerate(zip(models, dirs)):
        label = labels[i] if labels else Path(spec).name or spec
        lm = load_model(model_dir)
        ids = tokenize_stream(lm.tokenizer, text)
        res = perplexity(lm.model, ids, seqlen, max_windows, progress=progress, desc=label)
        res.dataset, res.model = desc, str(lm.path)
        rows.append(CompareRow(label, res, describe_quantization(lm.quantization)))
        del lm
    return rows


def format_table(rows: list[CompareRow]) -> str:
    """Plain-text table; the first row is the reference for the delta column."""
    head = ("model", "quantization", "ppl", "delta", "windows", "tokens", "seconds")
    ref = rows[0].result.ppl if rows else float("nan")
    body = [
        (r.label, r.quantization, f"{r.result.ppl:.4f}", "" if i == 0 else f"{r.result.ppl - ref:+.4f}",
         str(r.result.n_windows), str(r.result.n_tokens), f"{r.result.seconds:.1f}")
        for i, r in enumerate(rows)
    ]
    widths = [max(len(h), *(len(b[j]) for b in body)) for j, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(b) for b in body)])


def print_table(rows: list[CompareRow], out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout  # resolved at call time, not import time
    if rows:
        r = rows[0].result
        print(f"perplexity on {r.dataset}, seqlen {r.seqlen}, {r.n_windows} windows", file=out)
    print(format_table(rows), file=out)


def plot_bars(rows: list[CompareRow], path: str | os.PathLike) -> Path:
    """Bar chart of the perplexities, written atomically (temp file + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1), 4))
    vals = [r.result.ppl for r in rows]
    bars = ax.bar([r.label for r in rows], vals, color=["#777777"] + ["#3b75af"] * (len(rows) - 1))
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    if rows:
        r = rows[0].result
        ax.set_title(f"perplexity ({Path(r.dataset).name}, seqlen {r.seqlen}, {r.n_windows} windows)")
    ax.set_ylabel("perplexity (lower is better)")
    lo = min(vals) if vals else 0
    ax.set_ylim(bottom=max(0.0, lo * 0.9))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
