"""FP vs lowbit RTN / AWQ / GPTQ vs llm-compressor's AWQ and GPTQ in one run: end-to-end quantization
time, the quantizing process's peak RSS and WikiText-2 perplexity, side by side.

Same model directory, same calibration token blocks (lowbit's default C4 sample cut into
--samples x --seqlen blocks, handed to llm-compressor as a pre-tokenized dataset), same scheme
(W4 asymmetric, group 128 or lowbit's automatic size where 128 does not divide: 64 on the default
model; lm_head kept), same threads, and the same evaluation (lowbit's perplexity over each saved
checkpoint; llm-compressor writes compressed-tensors, which lowbit loads). Times are wall-clock for
the whole job in a fresh process: load, calibrate, search, save. If llm-compressor fails, its row
says so with the error line.

llm-compressor runs from its own virtual environment (./.bench-venvs/llmcompressor), created on
first use: CPU torch 2.13.0 is installed FIRST (from the local wheel), then llmcompressor with
torch pinned, so no CUDA build is ever pulled. It is never a lowbit dependency.

llm-compressor runs at its defaults for each modifier (AWQ: duo scaling; GPTQ: actorder "static",
dampening 0.01, block 128, min/max observer); lowbit at its own defaults (GPTQ: act order "weight",
dampening 0.01, the mse grid).

Run:  python benchmarks/quant_peer.py [--model qwen2.5-coder-0.5b] [--windows 16] [--samples 32 --seqlen 512]
                                      [--methods rtn,awq,gptq] [--peer-methods awq,gptq] [--skip-install]
--model: a directory, a .gguf, the default model (omitted), or a name from benchmarks/models.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.childproc import ChildRun, run_child  # noqa: E402
VENV = ROOT / ".bench-venvs" / "llmcompressor"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LLMC_VERSION = "0.14.0.1"
TORCH_VERSION = "2.13.0"

# Runs inside the llm-compressor venv: argv = model_dir calib.safetensors out_dir bits group_size threads method
LLMC_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.gptq import GPTQModifier

if not torch.accelerator.is_available():
    # llm-compressor 0.14 pins its activation cache for host-to-GPU copies even with no GPU, and
    # torch refuses to pin memory without an accelerator: skip the pinning (a no-op on CPU).
    from llmcompressor.pipelines.cache import IntermediatesCache
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

model_dir, calib, out, bits, gs, threads, method = sys.argv[1:8]
torch.set_num_threads(int(threads))
assert torch.version.cuda is None, "the benchmark venv must hold the CPU build of torch"
ids = load_file(calib)["input_ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
scheme = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": int(bits), "type": "int", "symmetric": False, "strategy": "group", "group_size": int(gs)}}}
if method == "awq":
    recipe = AWQModifier(ignore=["lm_head"], duo_scaling=True, config_groups=scheme)
else:  # its defaults: actorder "static", dampening 0.01, block 128
    recipe = GPTQModifier(ignore=["lm_head"], config_groups=scheme)
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
print("LLMC_RESULT " + json.dumps({"seconds": time.perf_counter() - t0}))
'''


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / f".installed-{LLMC_VERSION}"
    if stamp.exists():
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)  # CPU wheel first
    constraints = VENV / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    subprocess.run(pip + ["-c", str(constraints), f"llmcompressor=={LLMC_VERSION}"], check=True)
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    if not out.endswith("None"):
        raise SystemExit(f"{VENV}: torch is not the CPU build ({out}); remove the venv and retry")
    stamp.write_text(out + "\n")
    return py


def measured(cmd: list[str], env: dict[str, str]) -> ChildRun:
    """Run a quantization job in a child; its wall time and its own peak RSS."""
    return run_child(cmd, env=env, cwd=str(ROOT))


def main() -> int:
    import torch
    from safetensors.torch import save_file

    from benchmarks.models import resolve as resolve_named
    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream
    from lowbit.models.loader import load_tokenizer, read_hf_config, resolve_model_dir
    from lowbit.models.registry import resolve_config
    from lowbit.quant.loader import load_model
    from lowbit.quant.calibration import build_calibration
    from lowbit.quant.pipeline import auto_group_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model; or a benchmarks/models.py name")
    ap.add_argument("--samples", type=int, default=None, help="calibration blocks (default: lowbit's default)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per block (default: lowbit's default)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=None,
                    help="default: 128, or lowbit's automatic size where 128 does not divide (64 on the default model)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: out/quant_peer (default model), out/quant_peer-<model>")
    ap.add_argument("--skip-install", action="store_true", help="use the existing venv as is")
    ap.add_argument("--methods", default="rtn,awq,gptq", help="lowbit's methods: rtn, awq, gptq, awq-gptq (rtn always runs)")
    ap.add_argument("--peer-methods", default="awq,gptq", help="llm-compressor's: awq, gptq")
    ap.add_argument("--reuse-peer", action="store_true",
                    help="do not re-run llm-compressor: evaluate its checkpoints from an earlier run in --workdir and "
                         "report that run's recorded times (same calibration blocks required; checked)")
    a = ap.parse_args()
    from lowbit.quant.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN

    methods = ["rtn"] + [m for m in a.methods.split(",") if m and m != "rtn"]
    peer_methods = [m for m in a.peer_methods.split(",") if m]
    if set(methods) - set(LOWBIT_METHODS) or set(peer_methods) - set(PEER_METHODS):
        raise SystemExit(f"--methods: a subset of {', '.join(LOWBIT_METHODS)}; --peer-methods: of {', '.join(PEER_METHODS)}")
    samples, seqlen = a.samples or DEFAULT_SAMPLES, a.seqlen or DEFAULT_SEQLEN
    torch.set_num_threads(a.threads)
    model_dir = resolve_model_dir(resolve_named(a.model))
    group_size = a.group_size or auto_group_size(resolve_config(read_hf_config(model_dir)))
    work = Path(a.workdir) if a.workdir else ROOT / "out" / ("quant_peer" if a.model is None else f"quant_peer-{model_dir.name}")
    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else None
    py = VENV / "bin" / "python" if (a.skip_install or a.reuse_peer) else ensure_venv()

    calib = build_calibration(None, load_tokenizer(model_dir), samples, seqlen)
    calib_file = work / "calib_ids.safetensors"
    if previous is not None and "calib_sha256" not in previous and calib_file.exists():
        previous["calib_sha256"] = _sha256(calib_file)  # written by that run (older result files lack the hash)
    save_file({"input_ids": calib.input_ids.contiguous()}, str(calib_file))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    tag = f"w{a.bits}g{group_size}"
    seconds: dict[str, float | None] = {}
    rss: dict[str, int | None] = {}
    errors: dict[str, str] = {}
    checkpoints: dict[str, Path] = {"FP": model_dir}

    for method in methods:
        out = work / f"lowbit-{method}-{tag}"
        run = measured([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(model_dir), "--method", method,
                        "--w-bit", str(a.bits), "--group-size", str(group_size), "--calib-samples", str(samples),
                        "--calib-seqlen", str(seqlen), "--format", "compressed-tensors", "--out", str(out),
                        "--force", "--quiet"], env)
        if run.returncode != 0:
            sys.stderr.write(run.tail())
            raise SystemExit(f"lowbit {method} failed: {run.last_line()}")
        label = lowbit_label(method)
        seconds[label], rss[label], checkpoints[label] = run.seconds, run.peak_rss_bytes, out
        print(f"{label}: {run.seconds:.0f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB", flush=True)

    for method in peer_methods:
        label, peer = peer_label(method), work / f"llmcompressor-{method}-{tag}"
        if a.reuse_peer:
            recorded = _recorded_seconds(previous, label)
            same = previous and (previous.get("samples"), previous.get("seqlen")) == (samples, seqlen) \
                and recorded is not None and previous.get("calib_sha256") == _sha256(calib_file)
            if not same or not (peer / "config.json").exists():
                print(f"--reuse-peer: no earlier {label} run on the same calibration blocks in {work}", file=sys.stderr)
                return 2
            seconds[label], checkpoints[label] = recorded, peer
            rss[label] = (previous.get("peak_rss_bytes") or {}).get(label)
            print(f"{label}: {recorded:.0f} s (recorded by the earlier run, not re-run)", flush=True)
            continue
        run = measured([str(py), "-c", LLMC_CHILD, str(model_dir), str(calib_file), str(peer), str(a.bits),
                        str(group_size), str(a.threads), method], env)
        if run.returncode == 0:
            seconds[label], rss[label], checkpoints[label] = run.seconds, run.peak_rss_bytes, peer
            print(f"{label}: {run.seconds:.0f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB", flush=True)
        else:  # the table shows the failure with its error line rather than dropping the row
            sys.stderr.write(run.tail())
            errors[label] = run.last_line()
            print(f"{label}: FAILED: {errors[label]}", flush=True)

    text = read_eval_text(a.dataset)
    results: dict[str, float] = {}
    for label, spec in checkpoints.items():
        lm = load_model(spec)
        r = perplexity(lm.model, tokenize_stream(lm.tokenizer, text), 2048, a.windows, progress=True, desc=label)
        results[label] = r.ppl
        del lm
    print(f"\nW{a.bits} g{group_size} asym on {model_dir.name}; calibration {samples} x {seqlen} tokens "
          f"(the same blocks for every method); WikiText-2 test, seqlen 2048, first {a.windows} windows; {a.threads} threads")
    print(f"{'':22} {'ppl':>9} {'quantize (wall, s)':>20} {'peak RSS (GiB)':>15}")
    for label in [*checkpoints, *errors]:
        if label in errors:
            print(f"{label:22} FAILED: {errors[label]}")
            continue
        s_ = f"{seconds[label]:.0f}" if seconds.get(label) is not None else "-"
        m_ = f"{rss[label] / 2**30:.2f}" if rss.get(label) else "-"
        print(f"{label:22} {results[label]:9.4f} {s_:>20} {m_:>15}")
    verdict = peer_verdicts(results, seconds, [peer_label(m) for m in peer_methods])
    for line in verdict.lines:
        print(line)
    (work / "result.json").write_text(json.dumps({"ppl": results, "seconds": seconds, "peak_rss_bytes": rss,
                                                  "errors": errors, "group_size": group_size, "bits": a.bits,
                                                  "model": str(model_dir), "samples": samples, "seqlen": seqlen,
                                                  "windows": a.windows, "calib_sha256": _sha256(calib_file),
                                                  "peer_reused": a.reuse_peer}, indent=2))
    return 0 if verdict.ok else 2


LOWBIT_METHODS = ("rtn", "awq", "gptq", "awq-gptq")
PEER_METHODS = ("awq", "gptq")


def lowbit_label(method: str) -> str:
    return f"lowbit {method.upper()}"


def peer_label(method: str) -> str:
    return f"llm-compressor {method.upper()}"


PEER = peer_label("awq")


def _recorded_seconds(previous: dict | None, label: str) -> float | None:
    """A peer's time in an earlier result.json (older files keyed llm-compressor's AWQ as "llm-compressor")."""
    recorded = (previous or {}).get("seconds", {})
    return recorded.get(label, recorded.get("llm-compressor") if label == PEER else None)


@dataclass
class Verdict:
    lines: list[str]
    ok: bool


def _closed(ppl: dict[str, float], label: str) -> float:
    fp, rtn = ppl["FP"], ppl["lowbit RTN"]
    return (rtn - ppl[label]) / (rtn - fp) if rtn != fp else float("nan")


def peer_verdicts(ppl: dict[str, float], seconds: dict[str, float | None], peers: list[str] | None = None) -> Verdict:
    """The goals. AWQ: lowbit's closes >= 50% of RTN's gap, is no worse than llm-compressor's, and faster.
    Past AWQ (the GPTQ issue): the best lowbit method closes >= 60% and beats every llm-compressor method run."""
    peers = [PEER] if peers is None else peers
    lines, ok = [""], True
    if "FP" not in ppl or "lowbit RTN" not in ppl:
        return Verdict(lines + ["no FP or RTN perplexity: no verdict (FAIL)"], False)
    awq = lowbit_label("awq")
    if awq in ppl:
        closed = _closed(ppl, awq)
        ok &= closed >= 0.5
        lines.append(f"lowbit AWQ closes {100 * closed:.1f}% of RTN's gap (goal >= 50%): {'PASS' if closed >= 0.5 else 'FAIL'}")
    missing = [p for p in peers if p not in ppl]
    for p in missing:
        lines.append(f"{p} did not run: no comparison (FAIL)")
    if awq in ppl and PEER in ppl:
        faster = seconds[awq] < seconds[PEER]
        no_worse = ppl[awq] <= ppl[PEER]
        ok &= faster and no_worse
        lines.append(f"lowbit AWQ vs {PEER}: {seconds[PEER] / seconds[awq]:.2f}x faster: {'PASS' if faster else 'FAIL'}; "
                     f"ppl no worse: {'PASS' if no_worse else 'FAIL'}")
    ours = [label for label in ppl if label.startswith("lowbit ") and label != "lowbit RTN"]
    if ours:
        best = min(ours, key=lambda label: ppl[label])
        closed = _closed(ppl, best)
        beaten = [p for p in peers if p in ppl]
        beats = all(ppl[best] < ppl[p] for p in beaten)
        ok &= closed >= 0.6 and beats and not missing
        lines.append(f"best lowbit method: {best[7:]} ({ppl[best]:.4f}), closes {100 * closed:.1f}% of RTN's gap "
                     f"(goal >= 60%): {'PASS' if closed >= 0.6 else 'FAIL'}; beats "
                     f"{', '.join(f'{p} ({ppl[p]:.4f})' for p in beaten) or 'no peer'}: {'PASS' if beats and beaten else 'FAIL'}")
    gptq, peer_gptq = lowbit_label("gptq"), peer_label("gptq")
    if seconds.get(gptq) and seconds.get(peer_gptq):
        lines.append(f"GPTQ time: lowbit {seconds[gptq]:.0f} s, {peer_gptq} {seconds[peer_gptq]:.0f} s "
                     f"({seconds[peer_gptq] / seconds[gptq]:.2f}x)")
    return Verdict(lines, bool(ok) and not missing)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
