"""Serving: lowbit vs vLLM-CPU vs llama.cpp behind their OpenAI-compatible servers, in ONE run.

For each server in turn (never two at once, so each has both cores): start it on a free loopback
port, wait until GET /v1/models answers, run `lowbit bench serve` (streamed /v1/completions, the
same random prompts for every server: --input-len tokens of the default model's tokenizer, exactly
--output-len tokens out with ignore_eos, greedy) at each concurrency, then stop it.
  * lowbit:    `lowbit serve` on the AWQ W4 g64 checkpoint of the default model (W4A16 kernels, int8
               LM head, 1 GiB fp32 KV pool: 64 x 256 tokens fit without preemption)
  * vLLM-CPU:  benchmarks/peers/serve_vllm.sh on the fp32 HF directory (VLLM_CPU_NUM_OF_RESERVED_CPU=0)
  * llama.cpp: benchmarks/peers/serve_llamacpp.sh (llama-server, 2 threads, 64 slots) on the
               model's original Q4_1 GGUF
Each level sends max(8, 2 x concurrency) requests after one warm-up request. Prints output-token
throughput and p50 TTFT per server and level; writes all summaries as JSON.

    python benchmarks/compare_serving.py --w4 out/smollm2-135m-awq-w4g64 [--skip vllm] [--out out/bench/serving.json]
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))
from _common import exit_on_sigterm, free_port, stop_process_group, wait_http_ready  # noqa: E402


def bench(port: int, conc: int, n: int, a, tokenizer_dir: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
           "--concurrency", str(conc), "--num-requests", str(n), "--input-len", str(a.input_len),
           "--output-len", str(a.output_len), "--ignore-eos", "--tokenizer", tokenizer_dir,
           "--no-progress", "--out", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    exit_on_sigterm()
    sys.path.insert(0, str(ROOT))
    from lowbit.models.default import default_gguf_path
    from lowbit.models.loader import resolve_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w4", required=True, help="lowbit's AWQ W4 checkpoint of the default model")
    ap.add_argument("--fp", default=None, help="fp32 HF dir for vLLM (default: the built-in default model)")
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the cached default GGUF)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip", nargs="*", default=[], choices=["lowbit", "vllm", "llamacpp"])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "serving.json"))
    a = ap.parse_args()
    fp = str(resolve_model_dir(a.fp))
    gguf = a.gguf or str(default_gguf_path())
    levels = [int(c) for c in a.concurrency.split(",")]
    servers = {
        "lowbit": [sys.executable, "-m", "lowbit.cli", "serve", "--model", a.w4, "--served-model-name", "smollm2",
                   "--max-num-seqs", str(max(levels)), "--kv-cache-memory", "1GiB", "--quantize-lm-head"],
        "vllm": ["bash", str(PEERS / "serve_vllm.sh")],  # + port, dir
        "llamacpp": ["bash", str(PEERS / "serve_llamacpp.sh")],  # + port, gguf
    }
    results: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-serving-"))
    for name, base in servers.items():
        if name in a.skip:
            continue
        port = free_port()
        cmd = base + ["--port", str(port)] if name == "lowbit" else base + [str(port), fp if name == "vllm" else gguf]
        log = open(tmp / f"{name}.log", "w")
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http_ready(f"http://127.0.0.1:{port}/v1/models", proc, timeout=900, poll_s=2)
            bench(port, 1, 1, a, fp, tmp / "warmup.json")
            results[name] = {}
            for c in levels:
                s = bench(port, c, max(8, 2 * c), a, fp, tmp / f"{name}-{c}.json")
                results[name][c] = s
                print(f"  {name} c={c}: {s['output_throughput']:.1f} out tok/s, "
                      f"p50 TTFT {s['latency_ms']['ttft']['p50']:.0f} ms, {s['completed']}/{s['num_requests']} ok",
                      file=sys.stderr, flush=True)
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as e:
            print(f"  {name} failed: {e}; log: {tmp / f'{name}.log'}", file=sys.stderr)
        finally:
            stop_process_group(proc, signal.SIGINT, timeout=30)
            log.close()

    print(f"\nstreamed /v1/completions, {a.input_len} tokens in, {a.output_len} out (ignore_eos), greedy; "
          f"requests per level max(8, 2 x concurrency)")
    names = list(results)
    print(f"{'conc':>4} " + " ".join(f"{n + ' out tok/s':>20} {n + ' p50 TTFT ms':>22}" for n in names))
    for c in levels:
        cells = []
        for n in names:
            s = results[n].get(c)
            cells.append(f"{s['output_throughput']:20.1f} {s['latency_ms']['ttft']['p50']:22.0f}" if s else f"{'-':>20} {'-':>22}")
        print(f"{c:>4} " + " ".join(cells))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "results": results}, indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
