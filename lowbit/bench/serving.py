"""`lowbit bench serve`: load-test ANY OpenAI-compatible server (ours, vLLM's, llama.cpp's) over HTTP.

Streams every request (SSE) to time the first token and each later one, the way vLLM's
benchmark_serving.py does: TTFT, TPOT = (E2E - TTFT) / (output tokens - 1), ITL (gaps between
streamed chunks) and E2E latency, with p50/p90/p99, plus request and token throughput. Load is either a
fixed number of concurrent clients (--concurrency) or Poisson arrivals (--request-rate, optionally
capped by --concurrency).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LowbitError

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "has had one their its first after new who they two but been also more time year can city river "
         "music film game team world state school war house water light story people early small great "
         "north south model energy system market paper number second found known called played between "
         "during under against three history local public family general several later around").split()


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root or its /v1 URL (default %(default)s)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY or $LOWBIT_API_KEY)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None,
                   help="clients in flight at once (default 8 without --request-rate, unbounded with it)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals per second (default: send as fast as --concurrency allows)")
    p.add_argument("--input-len", type=int, default=128, help="random prompts: prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=None,
                   help="tokens to generate per request (default 128; ShareGPT: the dataset reply's length)")
    p.add_argument("--dataset", default=None, help="ShareGPT-format JSON file (default: random prompts)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir or model spec: exact random-token prompts and ShareGPT lengths")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos so every request generates exactly its output length (vLLM/lowbit/llama.cpp)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int | None  # known only with a tokenizer
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class BenchSummary:
    base_url: str
    model: str
    endpoint: str
    num_requests: int
    concurrency: int | None
    request_rate: float | None
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    latency_ms: dict[str, dict[str, float]]  # metric -> mean/p50/p90/p99
    errors: list[str]
    ttfts_ms: list[float | None]
    e2es_ms: list[float]
    output_lens: list[int]


# ---- prompts --------------------------------------------------------------------------------------


def _load_tokenizer(spec: str | None) -> Any:
    if spec is None:
        return None
    from ..models.loader import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(spec))


def random_requests(n: int, input_len: int, output_len: int, tokenizer: Any, rng: random.Random) -> list[BenchRequest]:
    """Random token ids decoded with the tokenizer (vLLM's random dataset), else random words."""
    reqs = []
    for _ in range(n):
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            vocab = len(tokenizer)
            ids = [t for t in (rng.randrange(vocab) for _ in range(input_len * 2)) if t not in special][:input_len]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reqs.append(BenchRequest(text, len(tokenizer.encode(text, add_special_tokens=False)), output_len))
        else:
            reqs.append(BenchRequest(" ".join(rng.choice(WORDS) for _ in range(input_len)), None, output_len))
    return reqs


def sharegpt_requests(path: str, n: int, output_len: int | None, tokenizer: Any,
                      rng: random.Random) -> list[BenchRequest]:
    """First human turn as the prompt; the reply's length as output length (unless --output-len)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read ShareGPT JSON ({e})") from None
    if not isinstance(data, list):
        raise LowbitError(f"{path}: expected a JSON list of {{'conversations': [...]}} records")
    pairs: list[tuple[str, str]] = []
    for rec in data:
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) for t in conv[:2]):
            q, a = conv[0].get("value"), conv[1].get("value")
            if isinstance(q, str) and isinstance(a, str) and q.strip():
                pairs.append((q, a))
    if not pairs:
        raise LowbitError(f"{path}: no conversations with a prompt and a reply")
    rng.shuffle(pairs)
    reqs: list[BenchRequest] = []
    for q, a in pairs:
        if tokenizer is not None:
            plen = len(tokenizer.encode(q, add_special_tokens=False))
            olen = output_len or len(tokenizer.encode(a, add_special_tokens=False))
            if plen < 4 or olen < 4 or plen > 1024 or plen + olen > 2048:  # vLLM's ShareGPT filter
                continue
        else:
            plen, olen = None, output_len or max(4, min(1024, int(len(a.split()) * 1.3)))
        reqs.append(BenchRequest(q, plen, olen))
        if len(reqs) == n:
            break
    if len(reqs) < n:  # small file: cycle through it
        reqs = [reqs[i % len(reqs)] for i in range(n)] if reqs else reqs
    if not reqs:
        raise LowbitError(f"{path}: no usable conversations (prompt 4..1024 tokens, total <= 2048)")
    return reqs


# ---- client ---------------------------------------------------------------------------------------


def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def _payload(args: argparse.Namespace, model: str, req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(obj: dict[str, Any]) -> str:
    parts = []
    for ch in obj.get("choices") or []:
        if "delta" in ch:
            parts.append((ch.get("delta") or {}).get("content") or "")
        else:
            parts.append(ch.get("text") or "")
    return "".join(parts)


async def send_one(client: Any, url: str, headers: dict[str, str], body: dict[str, Any]) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    last = t0
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))[:200]
                    return res
                now = time.perf_counter()
                if _chunk_text(obj):
                    chunks += 1
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                usage = obj.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = usage.get("prompt_tokens")
    except Exception as e:  # network errors, timeouts, bad JSON: count as a failed request
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.e2e = time.perf_counter() - t0
    if not res.output_tokens:
        res.output_tokens = chunks  # servers without usage in streams: about one token per chunk
    res.ok = True
    return res


async def _discover_model(client: Any, root: str, headers: dict[str, str]) -> str:
    try:
        r = await client.get(f"{root}/models", headers=headers)
    except Exception as e:
        raise LowbitError(f"cannot reach {root}/models ({type(e).__name__}: {e})") from None
    if r.status_code != 200:
        raise LowbitError(f"GET {root}/models answered HTTP {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    if not data:
        raise LowbitError(f"{root}/models lists no model; pass --model")
    return str(data[0]["id"])


async def _run(args: argparse.Namespace, reqs: list[BenchRequest]) -> tuple[str, list[RequestResult], float]:
    import httpx

    root = api_root(args.base_url)
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("LOWBIT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limit = args.concurrency or (8 if args.request_rate is None else None)
    limits = httpx.Limits(max_connections=limit or len(reqs), max_keepalive_connections=limit or len(reqs))
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = args.model or await _discover_model(client, root, headers)
        url = f"{root}/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
        sem = asyncio.Semaphore(limit) if limit else None
        bar = _progress(len(reqs), args.no_progress)
        results: list[RequestResult] = [RequestResult() for _ in reqs]

        async def one(i: int) -> None:
            if sem is None:
                results[i] = await send_one(client, url, headers, _payload(args, model, reqs[i]))
            else:
                async with sem:
                    results[i] = await send_one(client, url, headers, _payload(args, model, reqs[i]))
            bar.update(1)

        rng = random.Random(args.seed + 1)
        t0 = time.perf_counter()
        tasks = []
        for i in range(len(reqs)):
            tasks.append(asyncio.create_task(one(i)))
            if args.request_rate is not None and i + 1 < len(reqs):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return model, results, duration


def _progress(total: int, disabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", disable=disabled, file=sys.stderr)


# ---- summary --------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=float) * 1000.0
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(args: argparse.Namespace, model: str, reqs: list[BenchRequest], results: list[RequestResult],
              duration: float) -> BenchSummary:
    ok = [r for r in results if r.ok]
    in_tokens = sum((r.prompt_tokens if r.prompt_tokens is not None else (q.prompt_len or 0))
                    for q, r in zip(reqs, results) if r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    lat = {
        "ttft": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl": _stats([x for r in ok for x in r.itl]),
        "e2e": _stats([r.e2e for r in ok]),
    }
    dur = max(duration, 1e-9)
    return BenchSummary(
        base_url=args.base_url, model=model, endpoint=args.endpoint, num_requests=len(reqs),
        concurrency=args.concurrency or (8 if args.request_rate is None else None), request_rate=args.request_rate,
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration,
        request_throughput=len(ok) / dur, output_throughput=out_tokens / dur,
        total_token_throughput=(in_tokens + out_tokens) / dur, total_input_tokens=in_tokens,
        total_output_tokens=out_tokens, latency_ms=lat,
        errors=sorted({r.error for r in results if not r.ok})[:20],
        ttfts_ms=[None if r.ttft is None else r.ttft * 1000 for r in results],
        e2es_ms=[r.e2e * 1000 for r in results], output_lens=[r.output_tokens for r in results],
    )


def format_summary(s: BenchSummary) -> str:
    load = f"rate {s.request_rate}/s" if s.request_rate is not None else "max rate"
    lines = [
        f"==== serving benchmark: {s.model} @ {s.base_url} ({s.endpoint}, {load}, concurrency {s.concurrency}) ====",
        f"requests completed / failed     : {s.completed} / {s.failed}",
        f"duration                        : {s.duration_s:.2f} s",
        f"request throughput              : {s.request_throughput:.2f} req/s",
        f"output token throughput         : {s.output_throughput:.1f} tok/s",
        f"total token throughput          : {s.total_token_throughput:.1f} tok/s",
        f"input / output tokens           : {s.total_input_tokens} / {s.total_output_tokens}",
        f"{'latency (ms)':<32}: {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}",
    ]
    for name, label in (("ttft", "time to first token"), ("tpot", "time per output token"),
                        ("itl", "inter-token latency"), ("e2e", "end-to-end latency")):
        v = s.latency_ms[name]
        lines.append(f"{label:<32}: {v['mean']:9.1f} {v['p50']:9.1f} {v['p90']:9.1f} {v['p99']:9.1f}")
    for e in s.errors[:5]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def write_json_atomic(path: Path, obj: Any, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _validate(args: argparse.Namespace) -> None:
    if args.num_requests < 1:
        raise LowbitError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.concurrency is not None and args.concurrency < 1:
        raise LowbitError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.request_rate is not None and not args.request_rate > 0:
        raise LowbitError(f"--request-rate must be > 0, got {args.request_rate}")
    if args.input_len < 1 or (args.output_len is not None and args.output_len < 1):
        raise LowbitError("--input-len and --output-len must be >= 1")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise LowbitError(f"{args.out} already exists; pass --overwrite to replace it")


def run_serve_bench(args: argparse.Namespace) -> int:
    """Build the prompts, run the load, print the table, save JSON; 1 if no request succeeded."""
    _validate(args)
    rng = random.Random(args.seed)
    tokenizer = _load_tokenizer(args.tokenizer)
    if args.dataset:
        reqs = sharegpt_requests(args.dataset, args.num_requests, args.output_len, tokenizer, rng)
    else:
        reqs = random_requests(args.num_requests, args.input_len, args.output_len or 128, tokenizer, rng)
    model, results, duration = asyncio.run(_run(args, reqs))
    summary = summarize(args, model, reqs, results, duration)
    print(format_summary(summary))
    if args.out:
        write_json_atomic(Path(args.out), asdict(summary), args.overwrite)
        print(f"results written to {args.out}")
    return 0 if summary.completed else 1
