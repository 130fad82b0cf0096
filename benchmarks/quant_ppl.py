"""FP vs RTN vs AWQ (and GPTQ / AWQ-GPTQ with --methods) perplexity on WikiText-2 (raw test, seqlen
2048, first N windows) at W4 and W3 with AWQ's usual group size 128 (the automatic group size where 128
does not divide a linear's input features: 64 on the default model, said in the table) and W8 per-channel,
all asymmetric; plus each quantization's time and peak RSS.

Each quantized model is written as a real checkpoint (W4: AutoAWQ format; W3/W8: compressed-tensors)
by `lowbit quantize` in a child process (its peak RSS is that child's alone) and evaluated through
lowbit's loader and quantized kernels, i.e. exactly what `lowbit eval ppl` measures. Checkpoints are
kept in --workdir and reused on a second run, with their recorded time and RSS (delete them to
re-quantize). The acceptance figures printed at the end:
  W4: AWQ closes >= 50% of the gap RTN opens   (ppl_RTN - ppl_AWQ >= 0.5 (ppl_RTN - ppl_FP))
  W3: AWQ clearly below RTN
  W8 per-channel: within 0.5% of FP
  peak RSS of every quantization <= 1/3 of the fp32 checkpoint

Run:  python benchmarks/quant_ppl.py [--model qwen2.5-coder-1.5b] [--windows 16] [--configs w4,w3,w8ch]
                                     [--workdir out/quant_ppl] [--json results/quant_ppl.json]
--model: a directory, a .gguf, the default model (omitted), or a name from benchmarks/models.py.
--configs: w<bits> (group 128, or the automatic size), w<bits>g<size>, w<bits>ch (per channel).
--methods: any of rtn, awq, gptq, awq-gptq (default rtn,awq); the gap GPTQ / AWQ-GPTQ close is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_CONFIGS = "w4,w3,w8ch"
PREFERRED_GROUP = 128
GIB = 1024**3
METHODS = ("rtn", "awq", "gptq", "awq-gptq")


@dataclass(frozen=True)
class QuantConfig:
    name: str  # what the table and the checkpoint names say: w4g128, w3g64, w8ch
    bits: int
    group_size: int  # -1: per output channel
    fmt: str
    note: str = ""  # why the group size is not the one asked for


def parse_configs(spec: str, in_features: set[int], auto_group: int) -> list[QuantConfig]:
    """`w4,w3g64,w8ch` -> configs; a bare `w<bits>` takes group 128, or `auto_group` (the pipeline's
    automatic size) where 128 does not divide every linear's in_features, and says so."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"w(\d)(?:g(\d+)|(ch))?", item.strip())
        if not m:
            raise SystemExit(f"--configs: cannot read {item!r} (w<bits>, w<bits>g<size> or w<bits>ch)")
        bits = int(m.group(1))
        note = ""
        if m.group(3):
            gs = -1
        elif m.group(2):
            gs = int(m.group(2))
        elif all(i % PREFERRED_GROUP == 0 for i in in_features):
            gs = PREFERRED_GROUP
        else:
            gs = auto_group
            odd = sorted(i for i in in_features if i % PREFERRED_GROUP)
            note = f"auto g{gs}: {PREFERRED_GROUP} does not divide in_features {', '.join(map(str, odd))}"
        name = f"w{bits}ch" if gs == -1 else f"w{bits}g{gs}"
        out.append(QuantConfig(name, bits, gs, "awq" if bits == 4 else "compressed-tensors", note))
    return out


@dataclass
class Row:
    config: str
    method: str
    ppl: float
    quant_seconds: float | None
    peak_rss_bytes: int | None
    eval_seconds: float


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def quantize_child(model_dir: Path, cfg: QuantConfig, method: str, out: Path, threads: int) -> tuple[float, int]:
    """`lowbit quantize` in a child process; (seconds from its report, the child's peak RSS)."""
    from benchmarks.childproc import run_child

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(model_dir), "--method", method,
           "--w-bit", str(cfg.bits), "--group-size", str(cfg.group_size), "--format", cfg.fmt,
           "--out", str(out), "--force", "--quiet"]
    run = run_child(cmd, env=env, cwd=str(ROOT))
    if run.returncode != 0:
        sys.stderr.write(run.tail())
        raise SystemExit(f"quantization failed ({method} {cfg.name}): {run.last_line()}")
    seconds = json.loads((out / "quant_report.json").read_text())["total_seconds"]
    (out.parent / f"{out.name}.run.json").write_text(json.dumps(
        {"total_seconds": seconds, "child_wall_seconds": run.seconds, "peak_rss_bytes": run.peak_rss_bytes}))
    return seconds, run.peak_rss_bytes


def recorded_run(out: Path) -> tuple[float | None, int | None]:
    side = out.parent / f"{out.name}.run.json"
    if side.exists():
        r = json.loads(side.read_text())
        return r.get("total_seconds"), r.get("peak_rss_bytes")
    if (out / "quant_report.json").exists():
        return json.loads((out / "quant_report.json").read_text()).get("total_seconds"), None
    return None, None


def main() -> int:
    from benchmarks.models import resolve as resolve_named
    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream
    from lowbit.models.loader import read_hf_config, resolve_model_dir
    from lowbit.models.registry import resolve_config
    from lowbit.quant.heap import pin_mmap_threshold
    from lowbit.quant.loader import load_model
    from lowbit.quant.pipeline import auto_group_size, linear_shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model; or a benchmarks/models.py name")
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--workdir", default=str(ROOT / "out" / "quant_ppl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,awq",
                    help="comma-separated subset of rtn, awq, gptq, awq-gptq (default rtn,awq)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    methods = a.methods.split(",")
    if not methods or set(methods) - set(METHODS):
        raise SystemExit(f"--methods: a comma-separated subset of {', '.join(METHODS)}, not {a.methods!r}")
    torch.set_num_threads(a.threads)
    pin_mmap_threshold()  # as `lowbit quantize` does: this script owns its process
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    text = read_eval_text(a.dataset)
    model_dir = resolve_model_dir(resolve_named(a.model))
    mcfg = resolve_config(read_hf_config(model_dir))
    configs = parse_configs(a.configs, {fin for fin, _ in linear_shapes(mcfg).values()}, auto_group_size(mcfg))
    fp32_bytes = checkpoint_bytes(model_dir)

    def ppl_of(spec: str | Path) -> tuple[float, float]:
        lm = load_model(spec)
        r = perplexity(lm.model, tokenize_stream(lm.tokenizer, text), a.seqlen, a.windows, progress=True, desc=Path(spec).name)
        return r.ppl, r.seconds

    rows: list[Row] = []
    fp, fp_s = ppl_of(model_dir)
    rows.append(Row("-", "fp", fp, None, None, fp_s))
    for cfg in configs:
        for method in methods:
            out = work / f"{Path(model_dir).name}-{method}-{cfg.name}"
            if (out / "config.json").exists():
                q_s, rss = recorded_run(out)
            else:
                q_s, rss = quantize_child(model_dir, cfg, method, out, a.threads)
            p, e_s = ppl_of(out)
            rows.append(Row(cfg.name, method, p, q_s, rss, e_s))
            print(f"{cfg.name} {method}: ppl {p:.4f}", flush=True)

    print(f"\nWikiText-2 raw test, seqlen {a.seqlen}, first {a.windows} windows; model {model_dir} "
          f"(fp32 checkpoint {fp32_bytes / GIB:.2f} GiB)")
    for cfg in configs:
        if cfg.note:
            print(f"  {cfg.name}: {cfg.note}")
    print(f"{'config':8} {'method':8} {'ppl':>9} {'vs FP':>8} {'quant s':>8} {'peak RSS':>9} {'eval s':>7}")
    for r in rows:
        qs = f"{r.quant_seconds:.0f}" if r.quant_seconds is not None else "-"
        rss = f"{r.peak_rss_bytes / GIB:.2f}G" if r.peak_rss_bytes else "-"
        print(f"{r.config:8} {r.method:8} {r.ppl:9.4f} {100 * (r.ppl / fp - 1):+7.2f}% {qs:>8} {rss:>9} {r.eval_seconds:7.0f}")
    print()
    for line in verdicts(rows, configs, fp, fp32_bytes):
        print(line)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "model": str(model_dir), "fp32_checkpoint_bytes": fp32_bytes, "windows": a.windows, "seqlen": a.seqlen,
            "configs": [asdict(c) for c in configs], "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


def verdicts(rows: list[Row], configs: list[QuantConfig], fp: float, fp32_bytes: int) -> list[str]:
    """The acceptance lines, one per goal that the rows can answer."""
    by = {(r.config, r.method): r.ppl for r in rows}
    out = []
    for cfg in configs:
        rtn = by.get((cfg.name, "rtn"))
        for method in ("gptq", "awq-gptq"):
            p = by.get((cfg.name, method))
            if rtn is not None and p is not None:
                closed = (rtn - p) / (rtn - fp) if rtn != fp else float("nan")
                out.append(f"{cfg.name}: {method.upper()} ppl {p:.4f}, closes {100 * closed:.1f}% of RTN's gap")
    for cfg in configs:
        rtn, awq = by.get((cfg.name, "rtn")), by.get((cfg.name, "awq"))
        if rtn is None or awq is None:
            continue
        if cfg.bits == 4:
            closed = (rtn - awq) / (rtn - fp) if rtn != fp else float("nan")
            out.append(f"W4 {cfg.name}: AWQ closes {100 * closed:.1f}% of RTN's gap (goal >= 50%): "
                       f"{'PASS' if closed >= 0.5 else 'FAIL'}")
        elif cfg.bits == 3:
            out.append(f"W3 {cfg.name}: RTN {rtn:.3f} vs AWQ {awq:.3f}: {'PASS' if awq < rtn else 'FAIL'}")
        elif cfg.bits == 8:
            for m, p in (("RTN", rtn), ("AWQ", awq)):
                d = p / fp - 1
                out.append(f"W8 {cfg.name} {m}: {100 * d:+.3f}% vs FP (goal within 0.5%): "
                           f"{'PASS' if abs(d) <= 0.005 else 'FAIL'}")
    peaks = [r.peak_rss_bytes for r in rows if r.peak_rss_bytes]
    if peaks and fp32_bytes:
        worst = max(peaks)
        out.append(f"peak RSS of quantization: {worst / GIB:.2f} GiB = {worst / fp32_bytes:.2f} of the fp32 checkpoint "
                   f"(goal <= 1/3): {'PASS' if worst * 3 <= fp32_bytes else 'FAIL'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
