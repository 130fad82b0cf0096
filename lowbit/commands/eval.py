"""`lowbit eval ppl` and `lowbit eval compare`: perplexity of fp and quantized checkpoints."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..engine.args import DTYPES
from .engine_flags import add_model_arg, add_parallel_args, parallel_kwargs


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="evaluation text: a .txt file read as WikiText rows (e.g. wikitext-2-raw/wiki.test.raw) "
                        "or a .jsonl file (field 'text'); default: WikiText-2 test from Hugging Face (online)")
    p.add_argument("--seqlen", type=_positive, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=_positive, default=None, help="score only the first N windows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models (perplexity)")
    evsub = p.add_subparsers(dest="eval_command", metavar="{ppl,compare}")
    evsub.required = True

    ppl = evsub.add_parser("ppl", help="perplexity of one model (fp or quantized checkpoint)")
    add_model_arg(ppl)
    _data_args(ppl)
    add_parallel_args(ppl)
    ppl.add_argument("--dtype", choices=list(DTYPES), default="float32",
                     help="matrix multiplies in float32 (default: the reference) or bfloat16 with fp32 accumulation; "
                          "auto: bfloat16 where the CPU has native bf16")
    ppl.set_defaults(func=run_ppl)

    cmp = evsub.add_parser("compare", help="perplexity of several models on the same text, as one table")
    cmp.add_argument("--models", nargs="+", required=True, help="model dirs / names; the first is the reference")
    cmp.add_argument("--labels", nargs="+", default=None, help="one label per model")
    _data_args(cmp)
    cmp.add_argument("--plot", default=None, help="also write a PNG bar chart here")
    cmp.set_defaults(func=run_compare)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_ppl(args: argparse.Namespace) -> int:
    from ..eval.perplexity import evaluate_ppl

    r = evaluate_ppl(args.model, args.dataset, args.seqlen, args.max_windows, progress=not args.quiet,
                     dtype=args.dtype, **parallel_kwargs(args))
    print(f"perplexity {r.ppl:.4f}  (nll {r.nll:.4f}, {r.n_windows} windows x {r.seqlen} tokens, "
          f"{r.n_tokens} predictions, {r.seconds:.1f} s; {r.model} on {r.dataset})")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..errors import LowbitError
    from ..eval.compare import compare_models, plot_bars, print_table

    if args.labels is not None and len(args.labels) != len(args.models):
        raise LowbitError(f"got {len(args.labels)} labels for {len(args.models)} models; give one label per model")
    if args.plot is not None and Path(args.plot).is_dir():
        raise LowbitError(f"--plot {args.plot} is a folder; give a .png file path")
    rows = compare_models(args.models, args.labels, args.dataset, args.seqlen, args.max_windows, progress=not args.quiet)
    print_table(rows)
    if args.plot:
        if Path(args.plot).exists():
            print(f"replacing existing {args.plot}", file=sys.stderr)
        print(f"wrote {plot_bars(rows, args.plot)}", file=sys.stderr)
    return 0
