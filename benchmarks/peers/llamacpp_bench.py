#!/usr/bin/env python3
"""llama.cpp peer benchmark. Prints ONE JSON object on stdout; logs go to stderr.

Run it with the peer venv made by setup_peers.sh:
  .bench-venvs/llamacpp/bin/python benchmarks/peers/llamacpp_bench.py --gguf PATH --mode decode
  .bench-venvs/llamacpp/bin/python benchmarks/peers/llamacpp_bench.py --gguf PATH --mode throughput \
      --num-prompts 64 --input-len 128 --output-len 128 [--engine server|python]

decode:     batch 1, the fixed prompt of prompts.decode_prompt() (32 tokens), 128 new tokens, greedy,
            n_threads = n_threads_batch = 2, one warm-up then --runs (3) timed runs; the median TTFT
            (prompt eval + first token) and decode-phase tokens/s ((n-1) tokens / time from the 1st to
            the n-th token, timed per token in llama-cpp-python's token generator).
throughput: N requests of prompts.make_prompts(N, in, vocab) with exactly `out` new tokens each
            (EOS ignored), median wall time of --runs runs after a short warm-up.
            --engine server (default when the binary exists): llama.cpp's own `llama-server` (built by
            setup_peers.sh from the same vendored llama.cpp), --parallel slots with continuous batching,
            all N requests in flight at once (N concurrent HTTP clients).
            --engine python: llama-cpp-python's high-level API, which has no batching: the requests
            run one after another (its bundled OpenAI server also serves one request at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402
import prompts as P  # noqa: E402


def default_server_bin() -> str | None:
    cand = Path(sys.prefix) / "bin" / "llama-server"
    if cand.exists():
        return str(cand)
    return shutil.which("llama-server")


def load_llama(args, n_ctx: int):
    from llama_cpp import Llama

    C.log(f"loading {args.gguf} (n_ctx={n_ctx}, threads={args.threads})")
    return Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                 n_ctx=n_ctx, n_batch=args.n_batch, n_ubatch=args.n_batch, seed=0, verbose=args.verbose)


def build_stamp() -> str:
    stamp = Path(sys.prefix) / ".peer-build"
    return stamp.read_text().strip() if stamp.exists() else "unknown (built before .peer-build stamps)"


def build_info() -> dict:
    """Which llama.cpp build this venv holds (setup_peers.sh writes .peer-build: native or portable-avx2)
    and what its CPU backend reports using (llama_print_system_info: AVX2 = 1, AVX512 = 1, ...)."""
    import llama_cpp

    build = build_stamp()
    try:
        system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception as exc:  # informative only
        system = f"unavailable ({type(exc).__name__})"
    return {"build": build, "system_info": system}


def gen_timed(llm, prompt: list[int], n_out: int, t0: float) -> list[float]:
    """Greedy-generate exactly n_out tokens (EOS is not a stop here); the time of each token."""
    llm.reset()  # no KV reuse between runs: the whole prompt is evaluated every time
    times = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            reset=True):
        times.append(time.perf_counter())
        if len(times) == n_out:
            break
    assert len(times) == n_out
    return times


def run_decode(args, res):
    import llama_cpp

    llm = load_llama(args, n_ctx=args.n_ctx or (args.input_len + args.output_len + 64))
    vocab = args.vocab_size or llm.n_vocab()
    prompt = P.decode_prompt(vocab, input_len=args.input_len)
    res["engine"] = {"name": "llama-cpp-python", "version": llama_cpp.__version__,
                     "api": "Llama.generate (high-level, greedy sampler in C)", **build_info()}
    res["workload"] = {"batch": 1, "input_len": len(prompt), "output_len": args.output_len,
                       "vocab_size": vocab, "prompt_fingerprint": P.fingerprint(prompt)}
    C.log("warm-up")
    t0 = time.perf_counter()
    gen_timed(llm, prompt, args.output_len, t0)
    ttfts, tps, e2e = [], [], []
    for r in range(args.runs):
        t0 = time.perf_counter()
        times = gen_timed(llm, prompt, args.output_len, t0)
        ttfts.append(times[0] - t0)
        tps.append((len(times) - 1) / (times[-1] - times[0]))
        e2e.append(times[-1] - t0)
        C.log(f"run {r}: ttft {ttfts[-1]*1e3:.1f} ms, decode {tps[-1]:.1f} tok/s")
    res.update(C.decode_summary(ttfts, tps, e2e, args.output_len))


def run_throughput_python(args, res):
    import llama_cpp

    llm = load_llama(args, n_ctx=args.n_ctx or (args.input_len + args.output_len + 64))
    vocab = args.vocab_size or llm.n_vocab()
    prompts = P.make_prompts(args.num_prompts, args.input_len, vocab)
    res["engine"] = {"name": "llama-cpp-python", "version": llama_cpp.__version__, **build_info(),
                     "api": "Llama.generate, one request after another",
                     "batching": "none: llama-cpp-python's high-level API has no batching, so requests run sequentially"}
    res["workload"] = {"num_prompts": len(prompts), "input_len": args.input_len,
                       "output_len": args.output_len, "vocab_size": vocab,
                       "prompts_fingerprint": P.fingerprint(prompts)}
    C.log("warm-up (1 request)")
    gen_timed(llm, prompts[0], args.output_len, time.perf_counter())
    walls = []
    for r in range(args.runs):
        t0 = time.perf_counter()
        for p in prompts:
            gen_timed(llm, p, args.output_len, t0)
        walls.append(time.perf_counter() - t0)
        C.log(f"run {r}: {walls[-1]:.2f} s")
    res.update(C.throughput_summary(walls, len(prompts), args.input_len, args.output_len))


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_throughput_server(args, res):
    server_bin = args.server_bin or default_server_bin()
    if not server_bin:
        raise SystemExit("no llama-server binary: run benchmarks/peers/setup_peers.sh llamacpp, or --engine python")
    parallel = args.parallel or args.num_prompts
    ctx_per_slot = args.input_len + args.output_len + 16
    port = C.free_port()
    env = dict(os.environ, LLAMA_SERVER_BIN=server_bin, LLAMACPP_PARALLEL=str(parallel),
               LLAMACPP_CTX_PER_SLOT=str(ctx_per_slot), LLAMACPP_THREADS=str(args.threads),
               LLAMACPP_ENGINE="server")
    cmd = ["bash", str(HERE / "serve_llamacpp.sh"), str(port), args.gguf]
    C.log("starting:", " ".join(cmd), f"(parallel={parallel}, ctx/slot={ctx_per_slot})")
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        C.wait_http_ready(base + "/health", proc, 300)
        props = {}
        try:
            with urllib.request.urlopen(base + "/props", timeout=10) as r:
                props = json.loads(r.read())
        except Exception as e:  # informative only
            C.log("no /props:", e)
        vocab = args.vocab_size or _vocab_from_gguf(args.gguf)
        prompts = P.make_prompts(args.num_prompts, args.input_len, vocab)
        res["engine"] = {"name": "llama.cpp llama-server", "binary": server_bin,
                         "build": build_stamp(), "server_build_info": props.get("build_info"),
                         "parallel_slots": parallel,
                         "ctx_per_slot": ctx_per_slot, "threads": args.threads,
                         "batching": "continuous batching over --parallel slots; all requests sent concurrently",
                         "request": "POST /completion {prompt: token ids, n_predict, ignore_eos, temperature 0, cache_prompt false}"}
        res["workload"] = {"num_prompts": len(prompts), "input_len": args.input_len,
                           "output_len": args.output_len, "vocab_size": vocab,
                           "prompts_fingerprint": P.fingerprint(prompts)}

        def one(p):
            body = {"prompt": p, "n_predict": args.output_len, "ignore_eos": True, "temperature": 0.0,
                    "top_k": 1, "cache_prompt": False, "stream": False}
            out = _post(base + "/completion", body, timeout=3600)
            n = out.get("tokens_predicted") or out.get("timings", {}).get("predicted_n")
            if n != args.output_len:
                raise RuntimeError(f"server produced {n} tokens, wanted {args.output_len}")
            return out

        def batch(ps):
            with ThreadPoolExecutor(max_workers=len(ps)) as ex:
                return list(ex.map(one, ps))

        C.log("warm-up")
        batch(prompts[: min(len(prompts), parallel, 4)])
        walls = []
        for r in range(args.runs):
            t0 = time.perf_counter()
            batch(prompts)
            walls.append(time.perf_counter() - t0)
            C.log(f"run {r}: {walls[-1]:.2f} s")
        res.update(C.throughput_summary(walls, len(prompts), args.input_len, args.output_len))
    finally:
        C.stop_process_group(proc)


def _vocab_from_gguf(path: str) -> int:
    from llama_cpp import Llama

    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    return llm.n_vocab()


def run_decode_llama_bench(args, res: dict) -> None:
    """Batch-1 decode with llama.cpp's own `llama-bench` (same build as the bindings): `-p 0 -n OUT`, i.e.
    OUT tokens generated from an empty context, --runs repetitions; its per-run tokens/s (samples_ts).
    Why beside the bindings: on some CPUs the bindings' build crashes (SIGSEGV in libggml-cpu, seen on an
    Intel Xeon with AMX) while the binary runs. No prompt is given, so the 32-token prompt's KV is absent:
    a slightly easier workload than the other decode rows (noted in the result)."""
    binary = Path(sys.prefix) / "bin" / "llama-bench"
    if not binary.exists():
        raise SystemExit(f"no {binary}: run benchmarks/peers/setup_peers.sh llamacpp")
    cmd = [str(binary), "-m", args.gguf, "-p", "0", "-n", str(args.output_len), "-t", str(args.threads),
           "-r", str(args.runs), "-o", "json"]
    C.log(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-2000:])
        raise SystemExit(f"llama-bench failed with exit status {r.returncode}")
    row = json.loads(r.stdout)[0]
    tps = [float(t) for t in row["samples_ts"]]
    res.update(C.decode_summary([], tps, [], args.output_len))
    res["engine"] = {"name": "llama-bench", "build": row.get("build_commit"), "cpu_info": row.get("cpu_info")}
    res["method"] = f"llama-bench -p 0 -n {args.output_len}: generation from an empty context (no prompt)"


def main(argv=None):
    C.exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--mode", choices=["decode", "throughput"], required=True)
    ap.add_argument("--engine", choices=["auto", "server", "python", "bench"], default="auto",
                    help="throughput: auto = server when llama-server is installed, else python; decode: python "
                         "(default) or bench (llama.cpp's own llama-bench binary, tg of --output-len tokens)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=None,
                    help=f"default {P.DECODE_INPUT_LEN} (decode) / 128 (throughput)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-ctx", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=0, help="server slots (default: num-prompts)")
    ap.add_argument("--server-bin", default=None)
    ap.add_argument("--vocab-size", type=int, default=0,
                    help="prompt ids are drawn below this (default: the GGUF's n_vocab; compare_engine.py passes "
                         "prompts.prompt_vocab_size of the HF directory, the same for every engine)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.input_len is None:
        args.input_len = P.DECODE_INPUT_LEN if args.mode == "decode" else 128
    C.redirect_fd1_to_stderr()  # llama.cpp's C code may print on fd 1
    engine = args.engine
    if args.mode == "throughput" and engine == "auto":
        engine = "server" if (args.server_bin or default_server_bin()) else "python"
    res = C.base_result("llama.cpp", args.mode, args)
    res["threads"] = {"n_threads": args.threads, "n_threads_batch": args.threads}
    res["model"] = {"gguf": os.path.abspath(args.gguf)}
    if args.mode == "decode" and engine == "bench":
        run_decode_llama_bench(args, res)
    elif args.mode == "decode":
        run_decode(args, res)
    elif engine == "server":
        run_throughput_server(args, res)
    else:
        run_throughput_python(args, res)
    C.emit(res)


if __name__ == "__main__":
    main()
