"""Replicas on Ray (`lowbit serve --replicas`) against one engine, on one machine: issue 20's two measures.

1. throughput: `lowbit bench serve` (streamed /v1/completions, random prompts, --input-len in,
   exactly --output-len out, greedy) at --concurrency against
     A. `lowbit serve --replicas 2 --threads-per-replica 1` (a local Ray instance) and
     B. `lowbit serve --threads 2` (one engine);
   prints each side's median output throughput over --repeats runs, the ratio A/B (goal >= 0.9), and
   the ingress's own time per request at p50 (GET /cluster/replicas: time at the ingress minus time
   inside the replica, i.e. HTTP, parsing, tokenizing, routing and Ray transfers).
2. sessions: --sessions concurrent chat sessions; each first sends a --history-token message (not
   timed), then --turns turns of --new-tokens new tokens, each streamed with --new-tokens out;
   p50 TTFT over all timed turns, with session affinity (`--routing affinity`) against random
   routing (`--routing random`), 2 replicas x 1 thread each time; median over --repeats runs, and
   the ratio random/affinity (goal >= 3).

Servers run one at a time on a free loopback port and are stopped before the next starts.

    python benchmarks/compare_replicas.py [--model M] [--out out/bench/replicas.json]
    python benchmarks/compare_replicas.py --smoke   # tiny settings: checks the script, measures nothing
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
from _common import exit_on_sigterm, free_port, stop_process_group, wait_http_ready  # noqa: E402

WORDS = "the of and to in is was for on that with as by at from city river music film game team world".split()


@contextmanager
def server(flags: list[str], log_dir: Path, tag: str, timeout: float) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", "--port", str(port), "--served-model-name", "m"] + flags
    print(f"== {tag}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    log = open(log_dir / f"{tag}.log", "w")
    # PYTHONPATH: Ray's worker processes import this checkout of lowbit too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env)
    try:
        wait_http_ready(f"http://127.0.0.1:{port}/v1/models", proc, timeout=timeout, poll_s=2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc, signal.SIGINT, timeout=60)
        log.close()


def bench_serve(url: str, a: argparse.Namespace, n: int, conc: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "bench", "serve", "--base-url", url, "--concurrency", str(conc),
           "--num-requests", str(n), "--input-len", str(a.input_len), "--output-len", str(a.output_len),
           "--ignore-eos", "--no-progress", "--out", str(out), "--overwrite"]
    if a.tokenizer:
        cmd += ["--tokenizer", a.tokenizer]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return json.loads(out.read_text())


def throughput(a: argparse.Namespace, common: list[str], tmp: Path) -> dict:
    sides = {
        "replicas_2x1": ["--replicas", "2", "--threads-per-replica", "1"],
        "engine_1x2": ["--threads", "2"],
    }
    res: dict[str, Any] = {}
    for tag, flags in sides.items():
        with server(common + flags, tmp, tag, a.start_timeout) as url:
            bench_serve(url, a, 2, 1, tmp / "warmup.json")
            runs = [bench_serve(url, a, a.num_requests, a.concurrency, tmp / f"{tag}-{i}.json")
                    for i in range(a.repeats)]
            tps = [r["output_throughput"] for r in runs]
            res[tag] = {"output_throughput": tps, "median": statistics.median(tps),
                        "failed": sum(r["failed"] for r in runs)}
            if tag.startswith("replicas"):
                st = httpx.get(url + "/cluster/replicas", timeout=30).json()
                res[tag]["ingress_overhead_p50_ms"] = 1000 * (st["ingress_overhead"]["p50"] or float("nan"))
                res[tag]["routed"] = {r["name"]: r["routed"] for r in st["replicas"]}
            print(f"  {tag}: output tok/s {', '.join(f'{x:.1f}' for x in tps)} (median {res[tag]['median']:.1f})",
                  file=sys.stderr, flush=True)
    res["ratio"] = res["replicas_2x1"]["median"] / res["engine_1x2"]["median"]
    return res


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def _turn(client: httpx.AsyncClient, url: str, sid: str, text: str, max_tokens: int) -> float:
    """One streamed chat turn; returns its TTFT in seconds."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "session_id": sid, "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            if ttft is None and any(c["delta"].get("content") for c in obj.get("choices", [])):
                ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("no token streamed")
    return ttft


async def _sessions_once(url: str, a: argparse.Namespace, run: int) -> list[float]:
    rng = random.Random(run)
    # ~1.3 tokens per word of this vocabulary; the history message is sized in words to reach --history tokens
    history = [_text(rng, int(a.history / 1.3)) for _ in range(a.sessions)]
    turns = [[_text(rng, max(1, int(a.new_tokens / 1.3))) for _ in range(a.turns)] for _ in range(a.sessions)]
    limits = httpx.Limits(max_connections=a.sessions + 4, max_keepalive_connections=a.sessions + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def one(s: int) -> list[float]:
            sid = f"bench-{run}-{s}"
            await _turn(client, url, sid, history[s], a.new_tokens)  # the history: not timed
            out = [await _turn(client, url, sid, t, a.new_tokens) for t in turns[s]]
            await client.delete(f"{url}/v1/sessions/{sid}")
            return out

        per = await asyncio.gather(*(one(s) for s in range(a.sessions)))
    return [x for xs in per for x in xs]


def sessions(a: argparse.Namespace, common: list[str], tmp: Path) -> dict:
    res: dict[str, Any] = {}
    for policy in ("affinity", "random"):
        tag = f"sessions_{policy}"
        flags = common + ["--replicas", "2", "--threads-per-replica", "1", "--routing", policy]
        with server(flags, tmp, tag, a.start_timeout) as url:
            p50s = [1000 * statistics.median(asyncio.run(_sessions_once(url, a, run))) for run in range(a.repeats)]
        res[policy] = {"ttft_p50_ms": p50s, "median": statistics.median(p50s)}
        print(f"  {tag}: p50 TTFT ms {', '.join(f'{x:.0f}' for x in p50s)}", file=sys.stderr, flush=True)
    res["speedup"] = res["random"]["median"] / res["affinity"]["median"]
    return res


def main() -> int:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model for every server (default: the built-in default)")
    ap.add_argument("--tokenizer", default=None, help="bench serve's --tokenizer (default: the model's)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--history", type=int, default=1000, help="tokens of each session's first message")
    ap.add_argument("--new-tokens", type=int, default=20, help="new tokens per turn, in and out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-memory", default="2GiB", help="per engine / per replica")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "sessions"])
    ap.add_argument("--smoke", action="store_true", help="tiny settings to check the script (numbers mean nothing)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "replicas.json"))
    a = ap.parse_args()
    if a.smoke:
        a.concurrency, a.num_requests, a.input_len, a.output_len = 4, 4, 16, 4
        a.sessions, a.turns, a.history, a.new_tokens, a.repeats = 2, 2, 60, 4, 1
        a.kv_cache_memory = "64MiB"
    if a.tokenizer is None:
        sys.path.insert(0, str(ROOT))
        from lowbit.models.loader import resolve_model_dir

        a.tokenizer = str(resolve_model_dir(a.model))
    common = ["--kv-cache-memory", a.kv_cache_memory, "--max-num-seqs", str(max(a.concurrency, a.sessions))]
    if a.model:
        common = ["--model", a.model] + common
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-replicas-"))
    results: dict[str, Any] = {"args": vars(a)}
    if "throughput" not in a.skip:
        results["throughput"] = throughput(a, common, tmp)
    if "sessions" not in a.skip:
        results["sessions"] = sessions(a, common, tmp)
    print(f"\nlogs in {tmp}")
    if "throughput" in results:
        t = results["throughput"]
        print(f"throughput, c={a.concurrency}, {a.input_len} in / {a.output_len} out: 2 replicas x 1 thread "
              f"{t['replicas_2x1']['median']:.1f} tok/s, 1 engine x 2 threads {t['engine_1x2']['median']:.1f} tok/s "
              f"-> {t['ratio']:.2f}x (goal >= 0.9); ingress overhead p50 "
              f"{t['replicas_2x1']['ingress_overhead_p50_ms']:.2f} ms/request")
    if "sessions" in results:
        s = results["sessions"]
        print(f"sessions, {a.sessions} x {a.turns} turns of {a.new_tokens} tokens after {a.history}: p50 TTFT "
              f"affinity {s['affinity']['median']:.0f} ms, random {s['random']['median']:.0f} ms "
              f"-> {s['speedup']:.1f}x faster (goal >= 3)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
