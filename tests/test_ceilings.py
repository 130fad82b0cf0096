"""Smoke test: the ceiling probes run and return sane positive numbers (no timing assertions)."""
from __future__ import annotations

import math

import pytest

from lowbit.bench import ceilings
from lowbit.errors import LowbitError


def test_ceilings_return_positive_finite_numbers():
    c = ceilings.measure(n=64, bytes=4 * ceilings.MiB, repeats=2)
    for v in (c.matmul_flops, c.read_bytes_per_s, c.copy_bytes_per_s, c.bf16_matmul_flops):
        assert v > 0 and math.isfinite(v)


def test_int8_peak_counts_the_products_of_the_kernel_loop(isa):
    from lowbit import kernels

    per_step = {"avx2": 6 * 32, "avx512": 10 * 64}[isa]  # chains x products per instruction
    import torch

    assert kernels.BENCH.get().int8_mac_peak(3) == torch.get_num_threads() * 3 * per_step
    peak = ceilings.int8_mac_peak(iters=20_000, repeats=2)
    assert peak > 0 and math.isfinite(peak)


def test_machine_info_fields():
    info = ceilings.machine_info()
    assert info["logical_cores"] >= 1 and info["torch_threads"] >= 1
    assert isinstance(info["aten_cpu_capability"], str) and info["aten_cpu_capability"]
    assert isinstance(info["cpu_model"], str)


def test_repeats_must_be_positive():
    with pytest.raises(LowbitError):
        ceilings.matmul_flops(n=8, repeats=0)
