"""FP vs RTN vs AWQ (vs GPTQ / AWQ-GPTQ with --methods) perplexity on WikiText-2 (raw test, seqlen 2048, first N windows) for the
default model at W4 g64, W3 g64 and W8 per-channel (all asymmetric), plus quantization times.

Each quantized model is written as a real checkpoint (W4: AutoAWQ format; W3/W8:
compressed-tensors) and evaluated through lowbit's loader and quantized kernels, i.e. exactly
what `lowbit eval ppl` measures. Checkpoints are kept in --workdir and reused on a second run
(delete them to re-quantize). The acceptance figures printed at the end:
  W4 g64: AWQ closes >= 50% of the gap RTN opens   (ppl_RTN - ppl_AWQ >= 0.5 (ppl_RTN - ppl_FP))
  W3 g64: AWQ clearly below RTN
  W8 per-channel: within 0.5% of FP

--methods adds GPTQ and AWQ-GPTQ (default: rtn,awq); the gap each closes is printed for each.

Run:  python benchmarks/quant_ppl.py [--windows 16] [--configs w4g64,w3g64,w8ch] [--methods rtn,awq,gptq,awq-gptq]
      [--workdir out/quant_ppl]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

CONFIGS = {  # name -> (bits, group size, format)
    "w4g64": (4, 64, "awq"),
    "w3g64": (3, 64, "compressed-tensors"),
    "w8ch": (8, -1, "compressed-tensors"),
}


@dataclass
class Row:
    config: str
    method: str
    ppl: float
    quant_seconds: float | None
    eval_seconds: float


def main() -> int:
    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream
    from lowbit.models.loader import load_model, resolve_model_dir
    from lowbit.quant.pipeline import quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--workdir", default=str(ROOT / "out" / "quant_ppl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,awq", help="comma-separated: rtn, awq, gptq, awq-gptq (rtn is always run)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    text = read_eval_text(a.dataset)
    model_dir = resolve_model_dir(a.model)

    def ppl_of(spec: str | Path) -> tuple[float, float]:
        lm = load_model(spec)
        r = perplexity(lm.model, tokenize_stream(lm.tokenizer, text), a.seqlen, a.windows, progress=True, desc=Path(spec).name)
        return r.ppl, r.seconds

    rows: list[Row] = []
    fp, fp_s = ppl_of(model_dir)
    rows.append(Row("-", "fp", fp, None, fp_s))
    for name in a.configs.split(","):
        bits, gs, fmt = CONFIGS[name]
        methods = ["rtn", *[m for m in a.methods.split(",") if m and m != "rtn"]]
        for method in methods:
            out = work / f"{Path(model_dir).name}-{method}-{name}"
            q_s = None
            if not (out / "config.json").exists():
                t0 = time.perf_counter()
                quantize(model_dir, method, bits, gs, fmt=fmt, out_dir=out)
                q_s = time.perf_counter() - t0
            elif (out / "quant_report.json").exists():
                q_s = json.loads((out / "quant_report.json").read_text()).get("total_seconds")
            p, e_s = ppl_of(out)
            rows.append(Row(name, method, p, q_s, e_s))
            print(f"{name} {method}: ppl {p:.4f}", flush=True)

    print(f"\nWikiText-2 raw test, seqlen {a.seqlen}, first {a.windows} windows; model {model_dir}")
    print(f"{'config':8} {'method':8} {'ppl':>9} {'vs FP':>8} {'quant s':>8} {'eval s':>7}")
    for r in rows:
        qs = f"{r.quant_seconds:.0f}" if r.quant_seconds is not None else "-"
        print(f"{r.config:8} {r.method:8} {r.ppl:9.4f} {100 * (r.ppl / fp - 1):+7.2f}% {qs:>8} {r.eval_seconds:7.0f}")
    by = {(r.config, r.method): r.ppl for r in rows}
    print()
    for (config, method), p in by.items():
        if method in ("gptq", "awq-gptq") and (config, "rtn") in by:
            rtn = by[(config, "rtn")]
            closed = (rtn - p) / (rtn - fp) if rtn != fp else float("nan")
            print(f"{config}: {method.upper()} ppl {p:.4f}, closes {100 * closed:.1f}% of RTN's gap")
    if ("w4g64", "awq") in by:
        rtn, awq = by[("w4g64", "rtn")], by[("w4g64", "awq")]
        closed = (rtn - awq) / (rtn - fp) if rtn != fp else float("nan")
        print(f"W4 g64: AWQ closes {100 * closed:.1f}% of RTN's gap (goal >= 50%): {'PASS' if closed >= 0.5 else 'FAIL'}")
    if ("w3g64", "awq") in by:
        rtn, awq = by[("w3g64", "rtn")], by[("w3g64", "awq")]
        print(f"W3 g64: RTN {rtn:.3f} vs AWQ {awq:.3f}: {'PASS' if awq < rtn else 'FAIL'}")
    if ("w8ch", "awq") in by:
        for m in ("rtn", "awq"):
            d = by[("w8ch", m)] / fp - 1
            print(f"W8 per-channel {m.upper()}: {100 * d:+.3f}% vs FP (goal within 0.5%): {'PASS' if abs(d) <= 0.005 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
