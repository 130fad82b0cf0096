"""`lowbit bench latency | throughput | serve`: offline engine benchmarks and an HTTP load generator."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .engine_flags import add_engine_args, add_model_arg, engine_args_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: latency, throughput (offline engine), serve (any OpenAI server)")
    bsub = p.add_subparsers(dest="bench_command", metavar="{latency,throughput,session,serve}")
    bsub.required = True

    lat = bsub.add_parser("latency", help="batch-1 time to first token and decode tokens/s")
    _offline_args(lat)
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.set_defaults(func=run_latency)

    thr = bsub.add_parser("throughput", help="N requests at once: total and output tokens/s")
    _offline_args(thr)
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--input-len", type=int, default=128)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--prompts-file", default=None, help="JSON list of token-id lists (overrides random prompts)")
    thr.set_defaults(func=run_throughput)

    ses = bsub.add_parser("session", help="TTFT of a new turn after a long history: session vs re-sending it")
    _offline_args(ses)
    ses.add_argument("--history", type=int, default=1500)
    ses.add_argument("--new-tokens", type=int, default=20)
    ses.set_defaults(func=run_session, no_prefix_caching=True)

    from ..bench.serving import add_serve_bench_args, run_serve_bench

    srv = bsub.add_parser("serve", help="load-test an OpenAI-compatible server (ours, vLLM's, llama.cpp's)")
    add_serve_bench_args(srv)
    srv.set_defaults(func=run_serve_bench)


def _offline_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--repeats", type=int, default=3, help="runs after the warm-up; the median is reported")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    add_engine_args(p)


def _report(kind: str, engine, result, args: argparse.Namespace) -> int:
    from ..bench.offline import engine_summary

    data = {"benchmark": kind, **engine_summary(engine), "result": asdict(result)}
    rows = [(k, v) for k, v in asdict(result).items() if k != "runs"]
    width = max(len(k) for k, _ in rows)
    print(f"lowbit bench {kind}  (model bytes {data['model_bytes'] / 2**20:.1f} MiB, KV {data['kv_cache_dtype']}, "
          f"{data['kv_capacity_tokens']} tokens)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def run_latency(args: argparse.Namespace) -> int:
    from ..bench.offline import run_latency as bench
    from ..engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_args_from(args))
    return _report("latency", engine, bench(engine, args.input_len, args.output_len, args.repeats), args)


def run_throughput(args: argparse.Namespace) -> int:
    from ..bench.offline import run_throughput as bench
    from ..bench.prompts import load_prompts
    from ..engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_args_from(args))
    prompts = load_prompts(args.prompts_file) if args.prompts_file else None
    result = bench(engine, args.num_prompts, args.input_len, args.output_len, args.repeats, prompts)
    return _report("throughput", engine, result, args)


def run_session(args: argparse.Namespace) -> int:
    from ..bench.offline import run_session_ttft
    from ..engine.llm_engine import LLMEngine

    args.no_prefix_caching = True  # the re-send must recompute the history
    engine = LLMEngine(engine_args_from(args))
    return _report("session", engine, run_session_ttft(engine, args.history, args.new_tokens, args.repeats), args)
