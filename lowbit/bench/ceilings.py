"""Hardware ceilings that generation-speed results are judged against.

Decoding one token streams every weight from memory once, so tokens/s is bounded by
read bandwidth / bytes read per token; prefill is bounded by matmul FLOP/s. Benchmarks
report their figures as a fraction of these ceilings, measured on the same machine.

Bandwidth convention: weight streaming only *reads*, so the honest ceiling for "bytes read per
token" is `read_bandwidth` (a large sum() reduction, counting the bytes read). `copy_bandwidth`
counts read + write bytes of a large copy (the STREAM "copy" convention); it is reported as a
second opinion only (writes cost an uncounted read-for-ownership on x86 unless the copy uses
streaming stores, so it can land above or below the read figure): do not judge weight streaming
against it.

`python -m lowbit.bench.ceilings` prints all figures as JSON.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..errors import LowbitError

MiB = 1 << 20


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` after one warm-up call (page faults, thread-pool start-up)."""
    if repeats < 1:
        raise LowbitError(f"repeats must be >= 1, got {repeats}")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Median FLOP/s of an [n, n] x [n, n] matmul in `dtype` using all torch threads (2 n^3 FLOPs each).

    bfloat16: oneDNN's bf16 GEMM (AMX or AVX512_BF16 where the CPU has them, fp32 accumulation), the
    ceiling of the engine's bf16 matrix work, which the fp32 figure understates 3-6x on such CPUs."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    secs = _median_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return 2.0 * n**3 / secs


def read_bandwidth(bytes: int = 512 * MiB, repeats: int = 5) -> float:
    """Median bytes/s read by a sum() over a large fp32 buffer: the ceiling for weight streaming."""
    x = torch.ones(bytes // 4)
    secs = _median_seconds(lambda: x.sum(), repeats)
    return x.numel() * 4 / secs


def copy_bandwidth(bytes: int = 512 * MiB, repeats: int = 5) -> float:
    """Median bytes/s of a large fp32 copy, counting read + write (2 x the buffer size) per copy."""
    src = torch.ones(bytes // 4)
    dst = torch.empty_like(src)
    secs = _median_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / secs


def int8_mac_peak(iters: int = 2_000_000, repeats: int = 5) -> float | None:
    """Median int8 multiply-accumulates per second of lowbit's own register-only loop on every torch
    thread, with the instructions the int8 GEMMs use (AVX2 vpmaddubsw + vpmaddwd, AVX-512 VNNI
    vpdpbusd): the ceiling of W8A8 / W4A8 (an op is two of them). None without the compiled kernels."""
    from .. import kernels

    ext = kernels.BENCH.get()
    if ext is None:
        return None
    macs = ext.int8_mac_peak(1)
    secs = _median_seconds(lambda: ext.int8_mac_peak(iters), repeats)
    return macs * iters / secs


@dataclass
class Ceilings:
    matmul_flops: float  # FLOP/s, fp32
    read_bytes_per_s: float  # use this for weight streaming
    copy_bytes_per_s: float  # read + write counted
    machine: dict
    int8_macs_per_s: float | None = None  # int8 multiply-accumulates/s (None: no compiled kernels)
    bf16_matmul_flops: float | None = None  # FLOP/s of torch's bf16 matmul (fp32 accumulation)


def measure(n: int = 2048, bytes: int = 512 * MiB, repeats: int = 5) -> Ceilings:
    """All ceilings plus machine_info(), measured back to back."""
    return Ceilings(
        matmul_flops=matmul_flops(n, repeats),
        read_bytes_per_s=read_bandwidth(bytes, repeats),
        copy_bytes_per_s=copy_bandwidth(bytes, repeats),
        machine=machine_info(),
        int8_macs_per_s=int8_mac_peak(repeats=repeats),
        bf16_matmul_flops=matmul_flops(n, repeats, torch.bfloat16),
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict:
    """What a reader needs to compare two benchmark runs: CPU, cores, threads, SIMD level, versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_total_bytes": _mem_total_bytes(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def main() -> None:
    c = measure()
    print(json.dumps({
        **asdict(c),
        "matmul_gflops": round(c.matmul_flops / 1e9, 1),
        "bf16_matmul_gflops": round(c.bf16_matmul_flops / 1e9, 1),
        "read_gib_per_s": round(c.read_bytes_per_s / 2**30, 2),
        "copy_gib_per_s": round(c.copy_bytes_per_s / 2**30, 2),
        "int8_gops": None if c.int8_macs_per_s is None else round(2 * c.int8_macs_per_s / 1e9, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
