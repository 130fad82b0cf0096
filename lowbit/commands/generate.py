"""`lowbit generate`: stream a completion for one prompt to the terminal."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .engine_flags import add_engine_args, add_model_arg, engine_args_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt, streamed to the terminal")
    add_model_arg(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stats", action="store_true", help="print tokens/s and time to first token to stderr")
    add_engine_args(p)
    p.set_defaults(func=run)


def _seconds_since_process_start() -> float | None:
    """Wall time since this process was created (Linux /proc), so --stats can show the start-up a user
    waits through: interpreter, imports, model load and the first token."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run(args: argparse.Namespace) -> int:
    from ..engine.chat_template import apply_chat_template
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, ignore_eos=args.ignore_eos,
    )
    engine = LLMEngine(engine_args_from(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt: str | list[int] = apply_chat_template(engine.tokenizer, messages + [{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    t0 = time.perf_counter()
    engine.add_request("generate-0", prompt, params)
    printed, first, out, since_start = 0, None, None, None
    while engine.has_unfinished():
        for out in engine.step():
            text = out.outputs[0].text
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter()
                since_start = _seconds_since_process_start()
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    if args.stats and out is not None and first is not None:
        n = len(out.outputs[0].token_ids)
        decode_s = time.perf_counter() - first
        rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
        wall = "" if since_start is None else f" ({since_start:.2f} s after the command started)"
        print(f"[{n} tokens, time to first token {1000 * (first - t0):.0f} ms{wall}, decode {rate:.1f} tokens/s, "
              f"finish_reason={out.outputs[0].finish_reason}]", file=sys.stderr)
    return 0
