"""Batch-1 decode speed of the engine: tokens/s, ms per step, where the step's time goes, and how
close it is to the memory-bandwidth ceiling, measured in one run on this machine.

For each model (fp32 default model, and a W4A16 checkpoint if --w4 is given) and each thread count:
  * decode tokens/s and ms/step: `lowbit bench latency` internals (lowbit.bench.offline.run_latency,
    the shared 32-token decode prompt, greedy, EOS ignored), median of --repeats runs (wall time);
  * the same decode timed in process CPU time (cpu_ms_per_step): on a shared, overloaded machine
    wall time mostly measures how long other processes held the core; CPU time leaves that out
    (for 1 thread it is what an idle machine's wall time would be; for 2 threads it adds both);
  * the bandwidth ceiling: read bandwidth (lowbit.bench.ceilings.read_bandwidth, measured in this
    run, plus the same sum() timed in CPU time at 1 thread) / weight bytes read per token (every
    decoder linear + norms + the LM head; embedding rows are negligible), and the fraction reached
    (wall vs wall, and CPU vs CPU);
  * a per-step breakdown (--breakdown): time of each op family summed over --breakdown-steps decode
    steps with timing wrappers installed (CPU time by default), divided by the steps; "python +
    rest" is what is left of the step (dispatch, metadata, scheduler). The wrappers cost a little,
    so the instrumented step time is printed with it. No hook is put on a decoder module, so the
    engine's lean decode loop still runs.
Optionally (--batch N) the same for N concurrent sequences decoding together (ms/step, tokens/s).

The machine is shared: numbers move with load. Compare A/B at 1 and 2 threads, several repeats;
the 1-minute load average is printed with every figure.

    python benchmarks/bench_decode.py --w4 /tmp/w4 [--threads 1,2] [--repeats 5] [--breakdown] [--batch 64]
    LOWBIT_NO_EXT=1 python benchmarks/bench_decode.py ...   # the pure-torch path, for A/B
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import resolve as resolve_named  # noqa: E402
from benchmarks.peers.prompts import decode_prompt, prompt_vocab_size  # noqa: E402
from lowbit.bench.ceilings import read_bandwidth  # noqa: E402
from lowbit.bench.offline import run_latency  # noqa: E402
from lowbit.engine.args import EngineArgs  # noqa: E402
from lowbit.engine.llm_engine import LLMEngine  # noqa: E402
from lowbit.engine.sampling_params import SamplingParams  # noqa: E402
from lowbit import kernels  # noqa: E402
from lowbit.layers import ops  # noqa: E402


def read_bandwidth_cpu(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """read_bandwidth's sum() timed in process CPU time at 1 thread (bytes/s)."""
    x = torch.ones(nbytes // 4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    x.sum()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        x.sum()
        times.append(time.process_time() - c0)
    torch.set_num_threads(before)
    return nbytes / statistics.median(times)


def load1() -> float:
    return os.getloadavg()[0]


def module_bytes(m: torch.nn.Module) -> int:
    """Bytes a forward of `m` reads: its parameters and buffers (QuantLinear: packed + scales)."""
    if hasattr(m, "weight_bytes"):
        return m.weight_bytes()
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Decoder linears + norms + final norm + LM head: what one decode step streams."""
    total = sum(module_bytes(layer) for layer in model.model.layers)
    return total + module_bytes(model.model.norm) + module_bytes(model.lm_head)


# ----------------------------------------------------------------------------- breakdown
class Timers:
    """Accumulates time per label with `clock` (process CPU time by default: on a shared machine
    it leaves out the time this process was preempted; meaningful for 1-thread runs)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn):
        clock, total = self.clock, self.total

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                total[label] += clock() - t0

        return timed

    def hook(self, label: str, module: torch.nn.Module) -> list:
        state = {}

        def pre(_m, _a):
            state["t"] = self.clock()

        def post(_m, _a, _o):
            self.total[label] += self.clock() - state["t"]

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


_EXT_LABELS = {
    "rms_norm": "norm", "fused_add_rms_norm": "norm", "silu_and_mul": "silu*mul",
    "rotary_and_cache_qkv": "rotary+kv write", "rotary_qkv_": "rotary+kv write", "rotary_and_cache": "rotary+kv write",
    "rotary_": "rotary+kv write", "paged_decode_attention_qkv": "attention", "paged_decode_attention": "attention",
}


@contextmanager
def instrumented(engine: LLMEngine, timers: Timers):
    """Times op families without leaving the engine's lean decode loop: wraps the extension's
    functions, the linears' direct calls (executor._direct), the LM head, embedding, sampler
    and step metadata. No hook is put on a decoder module (that would force the module path)."""
    from lowbit.engine import executor, model_runner

    model = engine.runner.model
    ext = kernels.OPS.get()
    patches = [(model_runner, "build_paged_context", "step metadata")]
    if ext is not None:
        patches += [(ext, name, label) for name, label in _EXT_LABELS.items()]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    direct, sampler = executor._direct, engine.runner.sampler
    handles = []

    def timed_direct(m):
        fn = direct(m)
        return None if fn is None else timers.wrap("linears", fn)

    try:
        for obj, name, label in patches:
            setattr(obj, name, timers.wrap(label, getattr(obj, name)))
        executor._direct = timed_direct
        engine.runner.sampler = timers.wrap("sampler", sampler)
        handles += timers.hook("lm head", model.lm_head)
        handles += timers.hook("embedding", model.model.embed_tokens)
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        executor._direct, engine.runner.sampler = direct, sampler


def start_batch(engine: LLMEngine, prompt: list[int], batch: int, steps: int) -> None:
    """Adds `batch` requests (prompt shifted per request) and steps until each has its first token."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True)
    ids = set()
    for i in range(batch):
        rid = f"bd-{time.perf_counter()}-{i}"
        engine.add_request(rid, [32 + (t + i) % 49000 for t in prompt], params)
        ids.add(rid)
    started: set[str] = set()
    while started != ids:
        for out in engine.step():
            if out.outputs[0].token_ids:
                started.add(out.request_id)


def timed_steps(engine: LLMEngine, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step over `steps` pure decode steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def finish(engine: LLMEngine) -> None:
    engine.abort_request(list(engine.groups))
    while engine.has_unfinished():
        engine.step()


def decode_step_time(engine: LLMEngine, prompt: list[int], steps: int, batch: int) -> tuple[float, float]:
    start_batch(engine, prompt, batch, steps)
    t = timed_steps(engine, steps)
    finish(engine)
    return t


def breakdown(engine: LLMEngine, prompt: list[int], steps: int, batch: int, clock) -> dict:
    """ms per decode step by op family (see the module docstring), on `clock`."""
    timers = Timers(clock)
    start_batch(engine, prompt, batch, steps)
    with instrumented(engine, timers):
        wall, cpu = timed_steps(engine, steps)
    finish(engine)
    step = cpu if clock is time.process_time else wall
    per = {k: 1000 * v / steps for k, v in sorted(timers.total.items(), key=lambda kv: -kv[1])}
    per["python + rest"] = max(0.0, 1000 * step - sum(per.values()))
    per["step (instrumented)"] = 1000 * step
    return {k: round(v, 3) for k, v in per.items()}


# ----------------------------------------------------------------------------- main
def bench_model(label: str, model: str | None, args, bandwidth: float) -> list[dict]:
    from lowbit.models.loader import resolve_model_dir

    rows = []
    model = resolve_named(model)
    prompt = decode_prompt(prompt_vocab_size(resolve_model_dir(model)))  # 49152 on the default model, as before
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for threads in args.threads:
        torch.set_num_threads(threads)
        engine = LLMEngine(EngineArgs(model=model, quantize_lm_head=args.quantize_lm_head
                                      and label != "fp32", kv_cache_memory=256 << 20))
        wbytes = weight_bytes_per_token(engine.runner.model)
        res = run_latency(engine, output_len=args.output_len, repeats=args.repeats, prompt=prompt)
        tps = res.decode_tokens_per_s
        # CPU time per step: immune to preemption on a shared machine (1 thread: ~ idle wall time)
        runs = [decode_step_time(engine, prompt, args.output_len, 1) for _ in range(args.repeats)]
        cpu_ms = 1000 * statistics.median(c for _, c in runs)
        row = {
            "model": label, "threads": threads, "batch": 1,
            "decode_tokens_per_s": round(tps, 1), "ms_per_step": round(1000 / tps, 2),
            "runs_tokens_per_s": [round(r["decode_tokens_per_s"], 1) for r in res.runs],
            "cpu_ms_per_step": round(cpu_ms, 2), "tokens_per_cpu_s": round(1000 / cpu_ms, 1),
            "weight_mb_per_token": round(wbytes / 1e6, 1),
            "ceiling_tokens_per_s": round(bandwidth / wbytes, 1),
            "fraction_of_ceiling": round(tps * wbytes / bandwidth, 3),
            "cpu_ceiling_tokens_per_s": round(args.cpu_bandwidth / wbytes, 1),
            "cpu_fraction_of_ceiling": round(1000 / cpu_ms * wbytes / args.cpu_bandwidth, 3),
            "load1": round(load1(), 2),
        }
        if args.breakdown:
            row["breakdown_ms"] = breakdown(engine, prompt, args.breakdown_steps, 1, clock)
        rows.append(row)
        print(json.dumps(row), flush=True)
        for b in args.batch:
            runs = [decode_step_time(engine, prompt, args.batch_steps, b) for _ in range(max(1, args.repeats // 2))]
            wall = statistics.median(w for w, _ in runs)
            brow = {"model": label, "threads": threads, "batch": b, "ms_per_step": round(1000 * wall, 2),
                    "decode_tokens_per_s": round(b / wall, 1),
                    "cpu_ms_per_step": round(1000 * statistics.median(c for _, c in runs), 2), "load1": round(load1(), 2)}
            if args.breakdown:
                brow["breakdown_ms"] = breakdown(engine, prompt, args.batch_steps, b, clock)
            rows.append(brow)
            print(json.dumps(brow), flush=True)
        del engine
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp", default=None, help="fp32 model (default: the built-in default model; or a benchmarks/models.py name)")
    ap.add_argument("--w4", default=None, help="W4A16 checkpoint of the same model")
    ap.add_argument("--skip-fp", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-quantize-lm-head", dest="quantize_lm_head", action="store_false",
                    help="W4 model: keep the fp32 LM head (default: int8 head, --quantize-lm-head)")
    ap.add_argument("--breakdown", action="store_true", help="also time op families per step")
    ap.add_argument("--breakdown-steps", type=int, default=64)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="breakdown clock: process CPU time (default; use with 1 thread) or wall time")
    ap.add_argument("--batch", default="", help="also decode N sequences together, e.g. 64")
    ap.add_argument("--batch-steps", type=int, default=32)
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",") if t]
    args.batch = [int(b) for b in args.batch.split(",") if b]
    print(f"# ext: qgemm={'on' if kernels.available() else 'off'} ops={'on' if kernels.OPS.available() else 'off'}; "
          f"load1 {load1():.2f}", flush=True)
    torch.set_num_threads(max(args.threads))
    bw = read_bandwidth()
    args.cpu_bandwidth = read_bandwidth_cpu()
    print(f"# read bandwidth {bw / 1e9:.2f} GB/s wall ({max(args.threads)} threads), "
          f"{args.cpu_bandwidth / 1e9:.2f} GB/s per CPU-second (1 thread), load1 {load1():.2f}", flush=True)
    rows = []
    if not args.skip_fp:
        rows += bench_model("fp32", args.fp, args, bw)
    if args.w4:
        rows += bench_model("w4a16", args.w4, args, bw)
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"read_bandwidth": bw, "read_bandwidth_cpu": args.cpu_bandwidth, "rows": rows},
                                  indent=2))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
