"""The GPU device check's figures (issue 19), on random weights made on the device (no hub there).

  (a) W4A16 GEMV at M = 1 for K x N = 4096x4096, 4096x11008, 11008x4096 (g128): GB/s of weight
      bytes (codes + zeros + scales) over the HBM copy bandwidth measured in the same run; the
      default tile heuristic and the best of a small sweep (so choose_config can be retuned).
  (b) W4A16 GEMM TFLOP/s at M = 16, 64, 256 on the same shapes, next to torch's fp16 matmul on
      the dequantized weight.
  (c) batch-1 decode tok/s, Llama-2-7B-shaped model, W4 g128 vs fp16 through our engine and fp16
      through transformers' generate;
  (d) 64 requests x (128 in, 128 out), W4A16 vs fp16 through our engine;
  (e) greedy tokens on the GPU vs our CPU fp32 tokens for 32 prompts (default-model shape).
(c)-(e) need the engine's `device="cuda"` (EngineArgs.device); until it exists they print
"skipped: engine has no cuda backend yet".

Every kernel result is checked against the torch reference first (max rel err printed). Timing on
CUDA is triton.testing.do_bench (median; it clears L2 before each call, so GEMV reads HBM).

    python benchmarks/gpu_bench.py [--parts abcde] [--no-sweep]
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --smoke   # tiny shapes, CPU, checks only
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels.triton import layouts, ref  # noqa: E402

GEMV_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K = in, N = out)
GEMM_MS = (16, 64, 256)
GROUP = 128


@dataclasses.dataclass
class Ctx:
    dev: torch.device
    smoke: bool
    sweep: bool
    qg: object  # the quant_gemm module


def timed_ms(ctx: Ctx, fn) -> float:
    if ctx.dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def random_w4(k: int, n: int, dev: torch.device, seed: int = 0) -> layouts.PackedWeight:
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, device=dev, dtype=torch.uint8)
    s = torch.rand(n, k // GROUP, generator=g, device=dev) * 0.02 + 0.001
    z = torch.randint(0, 16, (n, k // GROUP), generator=g, device=dev, dtype=torch.uint8)
    return layouts.pack_awq4(q, s, z, GROUP)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def copy_bandwidth(ctx: Ctx) -> float | None:
    """GB/s of a device-to-device copy (read + write bytes), 1 GiB each way."""
    if ctx.dev.type != "cuda":
        return None
    n = 2**30 // 4
    src, dst = torch.empty(n, device=ctx.dev), torch.empty(n, device=ctx.dev)
    ms = timed_ms(ctx, lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def gemv_configs(ctx: Ctx):
    cfg = ctx.qg.GemmConfig
    if ctx.smoke:  # the sweep's code path, not its figures
        yield from (cfg(1, 64, 64, 2), cfg(1, 32, 32, 1))
        return
    for bn, bk, split, warps in itertools.product((64, 128, 256), (64, 128), (1, 2, 4, 8, 16), (4, 8)):
        yield cfg(1, bn, bk, split, warps)


def part_a(ctx: Ctx) -> None:
    bw = copy_bandwidth(ctx)
    print(f"(a) HBM copy bandwidth: {'%.0f GB/s' % bw if bw else 'n/a (no CUDA)'}")
    shapes = [(128, 64), (256, 32)] if ctx.smoke else GEMV_SHAPES
    for k, n in shapes:
        pw = random_w4(k, n, ctx.dev, seed=k + n)
        x = torch.randn(1, k, device=ctx.dev).half()
        err = rel_err(ctx.qg.quant_matmul(x, pw), ref.quant_matmul_ref(x, pw))
        ms = timed_ms(ctx, lambda: ctx.qg.quant_matmul(x, pw))
        gbs = pw.nbytes() / (ms * 1e-3) / 1e9
        line = f"(a) GEMV M=1 {k}x{n} g{GROUP}: max rel err {err:.1e}; default {ms * 1e3:.1f} us, {gbs:.0f} GB/s"
        if bw:
            line += f" = {100 * gbs / bw:.0f}% of copy bw"
        if ctx.sweep:
            best, failed = sweep(ctx, x, pw)
            if best:
                bgbs = pw.nbytes() / (best[0] * 1e-3) / 1e9
                line += f"; best {best[0] * 1e3:.1f} us{f' {100 * bgbs / bw:.0f}%' if bw else ''} with {best[1]}"
            line += f" ({failed} configs failed)" if failed else ""
        print(line, flush=True)


def sweep(ctx: Ctx, x: torch.Tensor, pw: layouts.PackedWeight) -> tuple[tuple[float, object] | None, int]:
    """Fastest GEMV config that also computes the right result; configs that fail are counted."""
    want, best, failed = ctx.qg.quant_matmul(x, pw), None, 0
    for c in gemv_configs(ctx):
        try:
            if rel_err(ctx.qg.quant_matmul(x, pw, config=c), want) > 1e-2:
                raise ValueError("wrong result")
            t = timed_ms(ctx, lambda c=c: ctx.qg.quant_matmul(x, pw, config=c))
        except Exception as e:  # a config this GPU cannot compile or run: report, keep sweeping
            failed += 1
            if failed == 1:
                print(f"    config {c} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        if best is None or t < best[0]:
            best = (t, c)
    return best, failed


def part_b(ctx: Ctx) -> None:
    shapes = [(128, 64)] if ctx.smoke else GEMV_SHAPES
    ms_list = (2, 17) if ctx.smoke else GEMM_MS
    for k, n in shapes:
        pw = random_w4(k, n, ctx.dev, seed=k * n)
        w_fp16 = ref.dequantize(pw).half()  # [K, N]
        for m in ms_list:
            x = torch.randn(m, k, device=ctx.dev).half()
            err = rel_err(ctx.qg.quant_matmul(x, pw), ref.quant_matmul_ref(x, pw))
            t_q = timed_ms(ctx, lambda: ctx.qg.quant_matmul(x, pw))
            t_fp = timed_ms(ctx, lambda: x @ w_fp16)
            flop = 2 * m * k * n
            print(f"(b) GEMM M={m} {k}x{n} g{GROUP}: max rel err {err:.1e}; W4A16 {flop / (t_q * 1e-3) / 1e12:.2f} "
                  f"TFLOP/s ({t_q * 1e3:.0f} us), torch fp16 on dequantized W {flop / (t_fp * 1e-3) / 1e12:.2f} "
                  f"TFLOP/s ({t_fp * 1e3:.0f} us)", flush=True)


def engine_has_cuda() -> bool:
    from lowbit.engine.args import EngineArgs

    return "device" in {f.name for f in dataclasses.fields(EngineArgs)}


def parts_cde(ctx: Ctx, parts: str, default_model: Path | None) -> None:
    wanted = [p for p in "cde" if p in parts]
    if not wanted:
        return
    if ctx.smoke or ctx.dev.type != "cuda" or not engine_has_cuda():
        why = "smoke run" if ctx.smoke else ("no CUDA" if ctx.dev.type != "cuda" else "engine has no cuda backend yet")
        for p in wanted:
            print(f"({p}) skipped: {why}")
        return
    from gpu_bench_engine import run_engine_parts  # noqa: E402  (lands with the engine's cuda backend)

    run_engine_parts(wanted, default_model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (runs under TRITON_INTERPRET=1)")
    ap.add_argument("--parts", default="abcde")
    ap.add_argument("--default-model", type=Path, default=None,
                    help="(e): a real default-model dir; without it, random weights of its shape")
    ap.add_argument("--no-sweep", action="store_true", help="skip the GEMV tile sweep in (a)")
    args = ap.parse_args(argv)
    from lowbit.kernels import triton as tk

    if not tk.available():
        print("triton kernels unavailable: install triton and run on CUDA (or TRITON_INTERPRET=1 --smoke)")
        return 1
    qg = tk.ops()["quant_matmul"].__module__
    ctx = Ctx(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.smoke, not args.no_sweep,
              sys.modules[qg])
    if ctx.dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    status = 0
    for part, fn in (("a", part_a), ("b", part_b)):
        if part in args.parts:
            try:
                fn(ctx)
            except Exception as e:  # one broken part must not cost the others' figures
                status = 1
                print(f"({part}) FAILED: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
    try:
        parts_cde(ctx, args.parts, args.default_model)
    except Exception as e:
        status = 1
        print(f"(c-e) FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
