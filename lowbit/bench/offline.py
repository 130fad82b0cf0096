"""Offline engine benchmarks: batch-1 latency (TTFT, decode tokens/s) and batch throughput.

Every figure is a median over `repeats` runs after one warm-up run, measured in this process
with the engine's own step loop (no HTTP), so it is what `LLM.generate` users get.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from ..engine.llm_engine import LLMEngine
from ..engine.model_runner import model_nbytes
from ..engine.sampling_params import SamplingParams
from .prompts import random_prompts


@dataclass
class LatencyResult:
    input_len: int
    output_len: int
    ttft_ms: float  # median time to first token
    decode_tokens_per_s: float  # median over runs of (output_len - 1) / (time after first token)
    e2e_s: float
    runs: list[dict]


@dataclass
class ThroughputResult:
    num_requests: int
    input_len: int
    output_len: int
    total_tokens_per_s: float  # (prompt + generated tokens) / wall time, median
    output_tokens_per_s: float
    elapsed_s: float
    runs: list[dict]
    preemptions: int


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def _one_latency_run(engine: LLMEngine, prompt: list[int], output_len: int) -> dict:
    t0 = time.perf_counter()
    engine.add_request(f"lat-{t0}", prompt, _params(output_len))
    first = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            if first is None and n:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_ms": 1000 * (first - t0), "decode_tokens_per_s": (n - 1) / (end - first), "e2e_s": end - t0,
            "tokens": n}


def run_latency(engine: LLMEngine, input_len: int = 32, output_len: int = 128, repeats: int = 3,
                prompt: list[int] | None = None) -> LatencyResult:
    prompt = prompt or random_prompts(1, input_len, engine.model_config.vocab_size, seed=1234)[0]
    _one_latency_run(engine, prompt, min(output_len, 8))  # warm-up
    runs = [_one_latency_run(engine, prompt, output_len) for _ in range(repeats)]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return LatencyResult(len(prompt), output_len, med("ttft_ms"), med("decode_tokens_per_s"), med("e2e_s"), runs)


def _one_throughput_run(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict:
    before = engine.stats().num_preemptions
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"thr-{t0}-{i}", p, _params(output_len))
    generated = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    total = generated + sum(len(p) for p in prompts)
    return {"elapsed_s": elapsed, "total_tokens_per_s": total / elapsed, "output_tokens_per_s": generated / elapsed,
            "generated": generated, "preemptions": engine.stats().num_preemptions - before}


def run_throughput(engine: LLMEngine, num_requests: int = 64, input_len: int = 128, output_len: int = 128,
                   repeats: int = 3, prompts: list[list[int]] | None = None,
                   prompt_sets: list[list[list[int]]] | None = None) -> ThroughputResult:
    """Median of `repeats` runs of all requests at once. Each run gets prompts no earlier run has
    seen (prompt_sets[r], else fresh random ones), and the prefix cache is emptied before every
    run, so no run is sped up by KV cached from the one before."""
    vocab = engine.model_config.vocab_size
    if prompt_sets is None:
        prompt_sets = ([prompts] * repeats if prompts
                       else [random_prompts(num_requests, input_len, vocab, seed=r) for r in range(repeats)])
    if len(prompt_sets) < repeats:
        raise ValueError(f"need {repeats} prompt sets, got {len(prompt_sets)}")
    warm = random_prompts(max(1, len(prompt_sets[0]) // 8), len(prompt_sets[0][0]), vocab, seed=10_000)
    _one_throughput_run(engine, warm, 8)
    runs = []
    for r in range(repeats):
        engine.reset_prefix_cache()
        runs.append(_one_throughput_run(engine, prompt_sets[r], output_len))
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    first = prompt_sets[0]
    return ThroughputResult(len(first), len(first[0]), output_len, med("total_tokens_per_s"),
                            med("output_tokens_per_s"), med("elapsed_s"), runs, sum(r["preemptions"] for r in runs))


def engine_summary(engine: LLMEngine) -> dict:
    s = engine.stats()
    runner = engine.runner
    return {
        "model": str(runner.loaded.path) if getattr(runner, "loaded", None) else engine.args.model,
        "engine_args": asdict(engine.args),
        "kv_cache_dtype": s.kv_cache_dtype,
        "dtype": getattr(getattr(runner, "shard", None), "dtype", None),  # what dtype auto resolved to
        "kv_capacity_tokens": s.kv_capacity_tokens,
        "model_bytes": model_nbytes(runner.model),
    }


@dataclass
class SessionResult:
    history_tokens: int
    new_tokens: int
    ttft_session_ms: float  # new turn with the session's KV cache kept on the engine
    ttft_resend_ms: float  # the whole history re-sent, no prefix caching
    speedup: float


def _ttft(engine: LLMEngine, prompt: list[int], session_id: str | None = None) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    engine.add_request(f"ses-{t0}", prompt, SamplingParams(temperature=0.0, max_tokens=1), session_id=session_id)
    ttft, out = None, []
    while engine.has_unfinished():
        for o in engine.step():
            if ttft is None and o.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            out = o.outputs[0].token_ids
    return 1000 * ttft, out


def run_session_ttft(engine: LLMEngine, history: int = 1500, new: int = 20, repeats: int = 3) -> SessionResult:
    """TTFT of a `new`-token turn after `history` tokens, with a stateful session vs re-sending it all.

    The engine must have prefix caching disabled so the re-send really recomputes the history.
    """
    vocab = engine.model_config.vocab_size
    with_session, resend = [], []
    for r in range(repeats):
        hist = random_prompts(1, history, vocab, seed=100 + r)[0]
        turn = random_prompts(1, new, vocab, seed=200 + r)[0]
        sid = f"bench-session-{time.perf_counter()}"
        _, reply = _ttft(engine, hist, session_id=sid)
        t_session, _ = _ttft(engine, hist + reply + turn, session_id=sid)
        engine.end_session(sid)
        t_resend, _ = _ttft(engine, hist + reply + turn)
        with_session.append(t_session)
        resend.append(t_resend)
    a, b = statistics.median(with_session), statistics.median(resend)
    return SessionResult(history, new, a, b, b / a)
