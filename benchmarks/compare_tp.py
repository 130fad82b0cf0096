"""Tensor parallelism on this machine: TP=2 (1 thread per rank) vs TP=1 (all threads), one run.

    python benchmarks/compare_tp.py [--model DIR] [--w4 DIR] [--runs 3] [--out results/tp.json]

Measures, each a median of --runs after a warm-up, every configuration in its own process (so
thread counts and core pinning never leak between them):
  * batch-1 W4 decode tok/s (32-token prompt, 128 new tokens, greedy, EOS ignored);
  * throughput, 64 requests x (128 in, 128 out), W4: generated tokens / wall second;
  * per-rank resident weight bytes against (sharded bytes / N + replicated bytes), as the memory
    measure of issue 18 asks (within 10%);
and prints the TP=2 / TP=1 ratios (the issue's bar: >= 0.9x). The all-reduce latency is
benchmarks/bench_allreduce.py. --w4: a W4 g64 checkpoint of the model; default: an RTN W4 g64
checkpoint made once into out/tp/ (same kernels and bytes as AWQ W4 g64).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_rtn_w4(src: Path, dst: Path) -> Path:
    """RTN W4 g64 of every decoder linear (AutoAWQ GEMM layout), tokenizer files copied."""
    from lowbit.models.weights import iter_tensors
    from lowbit.quant.checkpoint import save_quantized
    from lowbit.quant.primitives import quantize_weight

    if (dst / "config.json").exists():
        return dst
    hf = json.loads((src / "config.json").read_text())
    fp, quantized = {}, {}
    for name, t in iter_tensors(src):
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
            quantized[module] = quantize_weight(t.float(), 4, 64, False)
        else:
            fp[name] = t
    save_quantized(dst, hf_config=hf, fp_tensors=fp, quantized=quantized, fmt="awq")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def split_bytes(model) -> tuple[int, int]:
    """(bytes TP splits over the ranks, bytes every rank holds whole) of a whole model: the decoder
    linears and the LM head (vocab-parallel; a tied head becomes a copy of 1/N of the embedding
    rows) vs the embedding, norms and the rest."""
    from lowbit.engine.model_shard import model_nbytes

    linears = 0
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LINEARS or leaf in ("qkv_proj", "gate_up_proj"):
            linears += model_nbytes(m)
    replicated = model_nbytes(model) - linears
    if not model.config.tie_word_embeddings:
        replicated -= model_nbytes(model.lm_head)
    return linears + model_nbytes(model.lm_head), replicated


def child(model: str, tp: int, runs: int) -> dict:
    import torch

    from lowbit.engine.args import EngineArgs
    from lowbit.engine.llm_engine import LLMEngine
    from lowbit.engine.model_shard import model_nbytes
    from lowbit.engine.sampling_params import SamplingParams

    if tp == 1:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = LLMEngine(EngineArgs(model=model, tensor_parallel_size=tp, kv_cache_memory=256 << 20))
    out: dict = {"tp": tp, "threads": torch.get_num_threads()}
    try:
        vocab = min(engine.model_config.vocab_size, 20000)
        g = torch.Generator().manual_seed(0)

        def generate(prompts, n):
            for i, p in enumerate(prompts):
                engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            t0, first, tokens = time.perf_counter(), None, 0
            while engine.has_unfinished():
                outs = engine.step()
                if first is None and outs:
                    first = time.perf_counter()
                tokens += sum(1 for o in outs for _ in o.outputs)
            return t0, first, time.perf_counter(), tokens

        decode, thru = [], []
        prompt = torch.randint(10, vocab, (32,), generator=g).tolist()
        batch = [torch.randint(10, vocab, (128,), generator=g).tolist() for _ in range(64)]
        generate([prompt], 8)  # warm-up
        for _ in range(runs):
            _, first, end, _ = generate([prompt], 128)
            decode.append(127 / (end - first))
            t0, _, end, _ = generate(batch, 128)
            thru.append(64 * 128 / (end - t0))
        out["decode_tok_s"] = statistics.median(decode)
        out["throughput_tok_s"] = statistics.median(thru)
        ranks = {0: model_nbytes(engine.runner.model)}
        if tp > 1:
            ranks.update({r: v[0] for r, v in engine.runner.tp.worker_report.items()})
        else:
            out["sharded_bytes"], out["replicated_bytes"] = split_bytes(engine.runner.model)
        out["rank_weight_bytes"] = ranks
    finally:
        engine.close()
    return out


def run_child(model: str, tp: int, runs: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", model, "--tp", str(tp), "--runs", str(runs)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"TP={tp} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="fp model dir (default: the built-in default model)")
    ap.add_argument("--w4", default=None, help="W4 g64 checkpoint of the model (default: RTN, made into out/tp/)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tp, a.runs)))
        return
    from lowbit.models.loader import resolve_model_dir

    src = resolve_model_dir(a.model)
    w4 = Path(a.w4) if a.w4 else make_rtn_w4(src, ROOT / "out" / "tp" / f"{src.name}-rtn-w4g64")
    one, two = run_child(str(w4), 1, a.runs), run_child(str(w4), 2, a.runs)
    print(f"model {w4} ({os.cpu_count()} cores), medians of {a.runs}")
    print(f"{'':28s} {'TP=1 (' + str(one['threads']) + ' thr)':>14s} {'TP=2 (1 thr/rank)':>18s} {'ratio':>7s}")
    for key, label in (("decode_tok_s", "batch-1 W4 decode tok/s"), ("throughput_tok_s", "64x(128,128) tok/s")):
        print(f"{label:28s} {one[key]:14.1f} {two[key]:18.1f} {two[key] / one[key]:7.2f}x")
    sharded, replicated = one["sharded_bytes"], one["replicated_bytes"]
    print(f"weights: sharded {sharded / 2**20:.1f} MiB, replicated {replicated / 2**20:.1f} MiB")
    for rank, got in sorted(two["rank_weight_bytes"].items(), key=lambda kv: int(kv[0])):
        want = sharded / 2 + replicated
        print(f"  rank {rank}: resident {got / 2**20:.1f} MiB, expected ~{want / 2**20:.1f} MiB "
              f"(sharded/N + replicated): {got / want:.2f}x")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"tp1": one, "tp2": two, "model": str(w4)}, indent=2))


if __name__ == "__main__":
    main()
