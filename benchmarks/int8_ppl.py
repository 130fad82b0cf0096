"""Int8-activation perplexity: FP vs SmoothQuant W8A8 vs AWQ W4A16 vs the same AWQ checkpoint run as
W4A8 (`--activation-dtype int8`), on WikiText-2 (raw test, seqlen 2048, first N windows), through the
real loaders and kernels (what `lowbit eval ppl` measures).

Checkpoints are written by `lowbit quantize` in a child process (SmoothQuant: --method smoothquant,
compressed-tensors int-quantized; AWQ: W4 at the automatic group size, 64 on the default model) into
--workdir and reused on a second run. The acceptance lines printed at the end (issue 17):
  SmoothQuant W8A8 within 1% of FP;
  W4A8 within 1.5% of the same checkpoint in W4A16.

Run:  python benchmarks/int8_ppl.py [--model DIR] [--windows 16] [--workdir out/int8_ppl] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@dataclass
class Row:
    name: str
    ppl: float
    eval_seconds: float
    quant_seconds: float | None = None


def quantize_child(model_dir: Path, method: str, out: Path, threads: int) -> float:
    """`lowbit quantize` in a child process (defaults of the method); seconds from its report."""
    from benchmarks.childproc import run_child

    if (out / "config.json").exists():
        return json.loads((out / "quant_report.json").read_text())["total_seconds"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    extra = ["--format", "awq"] if method == "awq" else []
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(model_dir), "--method", method,
           *extra, "--out", str(out), "--force", "--quiet"]
    run = run_child(cmd, env=env, cwd=str(ROOT))
    if run.returncode != 0:
        sys.stderr.write(run.tail())
        raise SystemExit(f"quantization failed ({method}): {run.last_line()}")
    return json.loads((out / "quant_report.json").read_text())["total_seconds"]


def main() -> int:
    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream
    from lowbit.layers.linear_int8 import use_int8_activations
    from lowbit.models.loader import resolve_model_dir
    from lowbit.quant.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--workdir", default=str(ROOT / "out" / "int8_ppl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    text = read_eval_text(a.dataset)
    model_dir = resolve_model_dir(a.model)

    def ppl_of(path: Path, name: str, int8_acts: bool = False) -> Row:
        lm = load_model(path)
        if int8_acts:
            use_int8_activations(lm.model)
        r = perplexity(lm.model, tokenize_stream(lm.tokenizer, text), a.seqlen, a.windows, progress=True, desc=name)
        print(f"{name}: ppl {r.ppl:.4f}", flush=True)
        return Row(name, r.ppl, r.seconds)

    rows = [ppl_of(model_dir, "fp")]
    sq, awq = work / f"{model_dir.name}-smoothquant-w8a8", work / f"{model_dir.name}-awq-w4"
    sq_s = quantize_child(model_dir, "smoothquant", sq, a.threads)
    rows.append(ppl_of(sq, "smoothquant-w8a8"))
    rows[-1].quant_seconds = sq_s
    awq_s = quantize_child(model_dir, "awq", awq, a.threads)
    rows.append(ppl_of(awq, "awq-w4a16"))
    rows[-1].quant_seconds = awq_s
    rows.append(ppl_of(awq, "awq-w4a8", int8_acts=True))

    by = {r.name: r.ppl for r in rows}
    print(f"\nWikiText-2 raw test, seqlen {a.seqlen}, first {a.windows} windows; model {model_dir}")
    print(f"{'config':18} {'ppl':>9} {'vs FP':>8} {'quant s':>8} {'eval s':>7}")
    for r in rows:
        qs = f"{r.quant_seconds:.0f}" if r.quant_seconds is not None else "-"
        print(f"{r.name:18} {r.ppl:9.4f} {100 * (r.ppl / by['fp'] - 1):+7.2f}% {qs:>8} {r.eval_seconds:7.0f}")
    d8 = by["smoothquant-w8a8"] / by["fp"] - 1
    d4 = by["awq-w4a8"] / by["awq-w4a16"] - 1
    print(f"SmoothQuant W8A8: {100 * d8:+.2f}% vs FP (goal within 1%): {'PASS' if abs(d8) <= 0.01 else 'FAIL'}")
    print(f"W4A8: {100 * d4:+.2f}% vs the same checkpoint in W4A16 (goal within 1.5%): "
          f"{'PASS' if abs(d4) <= 0.015 else 'FAIL'}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": str(model_dir), "windows": a.windows, "seqlen": a.seqlen,
                                            "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
