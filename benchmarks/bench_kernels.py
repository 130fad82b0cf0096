"""Weight-only quantized linear kernels vs fp32 and PyTorch's packed-int ops, on CPU.

Prints median microseconds per call for every decode shape of the default model x batch rows M x
path, the effective weight-streaming rate (resident weight bytes / time) and the machine's
memory bandwidth (large copy and large read), so each kernel can be read as a % of the ceiling.

Why it looks the way it does:
* The product targets AVX2-only CPUs. This script pins ATen, MKL and oneDNN to AVX2 before torch
  is imported (ATEN_CPU_CAPABILITY alone leaves MKL's sgemm on AVX-512, which flatters fp32).
* The cores may be shared: paths are timed in interleaved rounds and the median of the rounds is
  reported, so a burst of foreign load hits every path alike.
* --cold cycles through enough copies of each weight to overflow the last-level cache, which is
  what decode sees when the model is larger than the cache (hot numbers can exceed DRAM speed).

Run:  python benchmarks/bench_kernels.py [--threads 2] [--m 1,8,64] [--cold]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

for _var, _val in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(_var, _val)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit import kernels  # noqa: E402
from lowbit.layers.linear import QuantLinear, quantize_embedding  # noqa: E402
from lowbit.layers.qweight import QuantizedWeight  # noqa: E402

# (in_features, out_features, name) for the default model: hidden 576, 9x64 heads, 3x64 kv heads,
# ffn 1536, vocab 49152 (tied LM head).
SHAPES = [
    (576, 576, "q/o_proj"),
    (576, 192, "k/v_proj"),
    (576, 1536, "gate/up"),
    (1536, 576, "down"),
    (576, 49152, "lm_head"),
]

Fn = Callable[[], object]


def time_paths(paths: dict[str, Fn], rounds: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each path, one sample per interleaved round."""
    inner: dict[str, int] = {}
    for name, fn in paths.items():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(budget_s / max(dt, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            n = inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def memory_bandwidth(mb: int, reps: int = 7) -> tuple[float, float]:
    """(copy GB/s counting read + write, read-only GB/s) on a buffer of `mb` MiB, medians."""
    n = mb * (1 << 20) // 4
    a = torch.ones(n)
    b = torch.empty_like(a)
    b.copy_(a)
    copy, read = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(copy) / 1e9, n * 4 / statistics.median(read) / 1e9


def random_qweight(n: int, k: int, bits: int, group: int, sym: bool, gen: torch.Generator) -> QuantizedWeight:
    """A QuantizedWeight with random codes (the kernels' speed does not depend on values)."""
    ng = k // group
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, ng, generator=gen) * 0.01 + 1e-3
    if sym:
        zeros = torch.full((n, ng), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 1 << bits, (n, ng), dtype=torch.uint8, generator=gen)
    return QuantizedWeight(q, scales, zeros, bits, group, sym)


def torch_int4pack(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PyTorch's CPU int4 layout. Its dequant is w = (q - 8) * scale + zero, with
    scales_and_zeros float [K/G, N, 2] (same dtype as the activations); so zero = (8 - z) * s."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.to(torch.int32), 1)
    s = qw.scales.float()
    z = (8.0 - qw.zeros.float()) * s
    return packed, torch.stack([s.t(), z.t()], dim=-1).contiguous(), qw.group_size


def torch_int8pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's int8 weight-only layout: int8 [N, K] with one fp scale per output row."""
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", default="1,8,64", help="comma-separated activation rows")
    ap.add_argument("--layers", default=",".join(name for _, _, name in SHAPES), help="subset of layer names")
    ap.add_argument("--group", type=int, default=64, help="4-bit group size (128 does not divide 576)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget-ms", type=float, default=2.0, help="time per path per round")
    ap.add_argument("--bw-mb", type=int, default=1024, help="buffer for the bandwidth test (beyond LLC)")
    ap.add_argument("--cold", action="store_true", help="overflow the cache between calls (fp32 and ours only)")
    ap.add_argument("--cold-mb", type=int, default=1024)
    ap.add_argument("--torch-ops", action="store_true", default=True)
    ap.add_argument("--no-torch-ops", dest="torch_ops", action="store_false", help="skip PyTorch's int4/int8pack paths")
    ap.add_argument("--modes", action="store_true", help="also time our kernels one by one (M = 1: fp32-x gemv; M > 1: small-M and tiled)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpu capability={torch.backends.cpu.get_cpu_capability()}, "
          f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS')}, ours={'ext' if kernels.available() else 'torch fallback'}")
    copy_bw, read_bw = memory_bandwidth(args.bw_mb)
    print(f"memory bandwidth ({args.bw_mb} MiB buffer, median): copy {copy_bw:.1f} GB/s (read+write), read {read_bw:.1f} GB/s")
    print(f"mode: {'COLD (weights evicted from cache)' if args.cold else 'hot (weights may sit in cache)'}; "
          f"GB/s = resident weight bytes / median time; %bw = GB/s / read bandwidth\n")
    header = (f"{'layer':9} {'K->N':>11} {'M':>3}  {'path':24} {'med us':>9} {'min us':>9} "
              f"{'GB/s':>7} {'%bw':>5} {'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    wanted = set(args.layers.split(","))
    for k, n, name in (shape for shape in SHAPES if shape[2] in wanted):
        w = torch.randn(n, k, generator=gen) * 0.02
        qw4 = random_qweight(n, k, 4, args.group, sym=False, gen=gen)
        layers = {
            f"ours int4 g{args.group}": QuantLinear.from_quantized(qw4),
            "ours int8 per-row": quantize_embedding(w)[1] if name == "lm_head"
            else QuantLinear.from_quantized(random_qweight(n, k, 8, k, sym=True, gen=gen)),
        }
        nbytes: dict[str, int] = {"fp32 F.linear": w.numel() * 4}
        nbytes.update({p: layer.weight_bytes() for p, layer in layers.items()})
        copies = 1
        if args.cold:
            copies = max(1, (args.cold_mb << 20) // (w.numel() * 4) + 1)
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        lcopies = {p: [layer] for p, layer in layers.items()}
        if args.cold:
            # Quantized copies are smaller: need more of them to overflow the cache.
            for p, layer in layers.items():
                c = max(1, (args.cold_mb << 20) // layer.weight_bytes() + 1)
                lcopies[p] = [layer] + [_clone_layer(layer) for _ in range(c - 1)]
        if args.torch_ops and not args.cold:
            p4, sz4, g4 = torch_int4pack(qw4)
            q8, s8 = torch_int8pack(w)
            nbytes["torch int4pack"] = p4.numel() + sz4.numel() * 4
            nbytes["torch int8pack"] = q8.numel() + s8.numel() * 4
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            paths: dict[str, Fn] = {"fp32 F.linear": _cycler(lambda wi: F.linear(x, wi), ws)}
            for p, lst in lcopies.items():
                paths[p] = _cycler(lambda layer: layer(x), lst)
                if args.modes and m == 1:  # the default gemv rounds x to int16; this one keeps fp32
                    paths[p + " fp32-x"] = _cycler(lambda layer: layer.forward_mode(x, 4), lst)
                if args.modes and m > 1:
                    paths[p + " small"] = _cycler(lambda layer: layer.forward_mode(x, 2), lst)
                    paths[p + " tiled"] = _cycler(lambda layer: layer.forward_mode(x, 3), lst)
            if args.torch_ops and not args.cold:
                paths["torch int4pack"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p4, g4, sz4)
                paths["torch int8pack"] = lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8)
                paths["dequant+F.linear"] = lambda: F.linear(x, qw4.dequantize())
            res = _time_with_slow_cap(paths, args)
            base = statistics.median(res["fp32 F.linear"])
            for p, ts in res.items():
                t = statistics.median(ts)
                key = p.replace(" small", "").replace(" tiled", "").replace(" fp32-x", "")
                b = nbytes.get(key, nbytes[next(iter(layers))] if key.startswith("dequant") else 0)
                gbs = b / t / 1e9
                print(f"{name:9} {f'{k}->{n}':>11} {m:>3}  {p:24} {t * 1e6:9.1f} {min(ts) * 1e6:9.1f} "
                      f"{gbs:7.1f} {100 * gbs / read_bw:5.0f} {base / t:7.2f}x")
        print()


def _clone_layer(layer: QuantLinear) -> QuantLinear:
    """An independent copy (own storage) of a QuantLinear, for the cold-cache rotation."""
    return copy.deepcopy(layer)


def _cycler(call: Callable[[object], object], items: list) -> Fn:
    """A no-argument function that applies `call` to the next item of `items` each time."""
    if len(items) == 1:
        only = items[0]
        return lambda: call(only)
    state = {"i": 0}

    def fn() -> object:
        i = state["i"]
        state["i"] = (i + 1) % len(items)
        return call(items[i])

    return fn


def _time_with_slow_cap(paths: dict[str, Fn], args: argparse.Namespace) -> dict[str, list[float]]:
    """Times fast paths in interleaved rounds; a path slower than 50 ms/call is timed 3x alone."""
    fast, slow = {}, {}
    for name, fn in paths.items():
        t0 = time.perf_counter()
        fn()
        (slow if time.perf_counter() - t0 > 0.05 else fast)[name] = fn
    res = time_paths(fast, args.rounds, args.budget_ms / 1e3)
    for name, fn in slow.items():
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        res[name] = ts
    return {name: res[name] for name in paths}


if __name__ == "__main__":
    main()
