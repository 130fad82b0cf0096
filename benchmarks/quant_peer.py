"""lowbit AWQ vs llm-compressor AWQ on the default model: end-to-end quantization time and
WikiText-2 perplexity, side by side.

Same model directory, same calibration token blocks (lowbit's default C4 sample cut into
--samples x --seqlen blocks, handed to llm-compressor as a pre-tokenized dataset), same scheme
(W4 asymmetric, group 64, lm_head kept), same threads, and the same evaluation (lowbit's
perplexity over each saved checkpoint; llm-compressor writes compressed-tensors, which lowbit
loads). Times are wall-clock for the whole job in a fresh process: load, calibrate, search, save.

llm-compressor runs from its own virtual environment (./.bench-venvs/llmcompressor), created on
first use: CPU torch 2.13.0 is installed FIRST (from the local wheel), then llmcompressor with
torch pinned, so no CUDA build is ever pulled. It is never a lowbit dependency.

Run:  python benchmarks/quant_peer.py [--windows 16] [--samples 32 --seqlen 512] [--skip-install]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venvs" / "llmcompressor"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LLMC_VERSION = "0.14.0.1"
TORCH_VERSION = "2.13.0"

# Runs inside the llm-compressor venv: argv = model_dir calib.safetensors out_dir bits group_size threads
LLMC_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier

if not torch.accelerator.is_available():
    # llm-compressor 0.14 pins its activation cache for host-to-GPU copies even with no GPU, and
    # torch refuses to pin memory without an accelerator: skip the pinning (a no-op on CPU).
    from llmcompressor.pipelines.cache import IntermediatesCache
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

model_dir, calib, out, bits, gs, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
assert torch.version.cuda is None, "the benchmark venv must hold the CPU build of torch"
ids = load_file(calib)["input_ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
recipe = AWQModifier(
    ignore=["lm_head"],
    duo_scaling=True,
    config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": int(bits), "type": "int", "symmetric": False, "strategy": "group", "group_size": int(gs)}}},
)
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


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd[:4])} ...")
    return dt, proc.stdout + proc.stderr


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream
    from lowbit.models.loader import load_tokenizer, resolve_model_dir
    from lowbit.quant.loader import load_model
    from lowbit.quant.calibration import build_calibration

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--samples", type=int, default=None, help="calibration blocks (default: lowbit's default)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per block (default: lowbit's default)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=str(ROOT / "out" / "quant_peer"))
    ap.add_argument("--skip-install", action="store_true", help="use the existing venv as is")
    ap.add_argument("--reuse-peer", action="store_true",
                    help="do not re-run llm-compressor: evaluate its checkpoint from an earlier run in --workdir and "
                         "report that run's recorded time (same calibration blocks required; checked)")
    a = ap.parse_args()
    from lowbit.quant.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN

    samples, seqlen = a.samples or DEFAULT_SAMPLES, a.seqlen or DEFAULT_SEQLEN
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(a.model)
    previous = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else None
    py = VENV / "bin" / "python" if (a.skip_install or a.reuse_peer) else ensure_venv()

    calib = build_calibration(None, load_tokenizer(model_dir), samples, seqlen)
    calib_file = work / "calib_ids.safetensors"
    if previous is not None and "calib_sha256" not in previous and calib_file.exists():
        previous["calib_sha256"] = _sha256(calib_file)  # written by that run (older result files lack the hash)
    save_file({"input_ids": calib.input_ids.contiguous()}, str(calib_file))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    tag = f"w{a.bits}g{a.group_size}"

    ours = work / f"lowbit-awq-{tag}"
    t_ours, _ = timed([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(model_dir), "--method", "awq",
                       "--w-bit", str(a.bits), "--group-size", str(a.group_size), "--calib-samples", str(samples),
                       "--calib-seqlen", str(seqlen), "--format", "compressed-tensors", "--out", str(ours),
                       "--force", "--quiet"], env)
    print(f"lowbit AWQ: {t_ours:.0f} s", flush=True)

    peer = work / f"llmcompressor-awq-{tag}"
    if a.reuse_peer:
        same = previous and (previous.get("samples"), previous.get("seqlen")) == (samples, seqlen)
        if not same or not (peer / "config.json").exists() or previous.get("calib_sha256") != _sha256(calib_file):
            print(f"--reuse-peer: no earlier llm-compressor run on the same calibration blocks in {work}", file=sys.stderr)
            return 2
        t_peer = previous["seconds"]["llm-compressor"]
        print(f"llm-compressor AWQ: {t_peer:.0f} s (recorded by the earlier run, not re-run)", flush=True)
    else:
        t_peer, log = timed([str(py), "-c", LLMC_CHILD, str(model_dir), str(calib_file), str(peer), str(a.bits),
                             str(a.group_size), str(a.threads)], env)
        print(f"llm-compressor AWQ: {t_peer:.0f} s", flush=True)

    text = read_eval_text(a.dataset)
    results = {}
    for label, spec in (("FP", model_dir), ("lowbit AWQ", ours), ("llm-compressor AWQ", peer)):
        lm = load_model(spec)
        r = perplexity(lm.model, tokenize_stream(lm.tokenizer, text), 2048, a.windows, progress=True, desc=label)
        results[label] = r.ppl
        del lm
    print(f"\nW{a.bits} g{a.group_size} asym AWQ on {model_dir.name}; calibration {samples} x {seqlen} tokens "
          f"(same blocks for both); WikiText-2 test, seqlen 2048, first {a.windows} windows; {a.threads} threads")
    print(f"{'':22} {'ppl':>9} {'quantize (wall, s)':>20}")
    print(f"{'FP':22} {results['FP']:9.4f} {'-':>20}")
    print(f"{'lowbit AWQ':22} {results['lowbit AWQ']:9.4f} {t_ours:20.0f}")
    print(f"{'llm-compressor AWQ':22} {results['llm-compressor AWQ']:9.4f} {t_peer:20.0f}")
    faster = t_ours < t_peer
    no_worse = results["lowbit AWQ"] <= results["llm-compressor AWQ"]
    print(f"\nlowbit is {t_peer / t_ours:.2f}x faster: {'PASS' if faster else 'FAIL'}; "
          f"ppl no worse: {'PASS' if no_worse else 'FAIL'}")
    (work / "result.json").write_text(json.dumps({"ppl": results, "seconds": {"lowbit": t_ours, "llm-compressor": t_peer},
                                                  "samples": samples, "seqlen": seqlen, "windows": a.windows,
                                                  "calib_sha256": _sha256(calib_file),
                                                  "peer_reused": a.reuse_peer}, indent=2))
    return 0 if faster and no_worse else 2


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
