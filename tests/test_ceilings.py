"""Smoke test: the ceiling probes run and return sane positive numbers (no timing assertions)."""
from __future__ import annotations

import math

import pytest

from lowbit.bench import ceilings
from lowbit.errors import LowbitError


def test_ceilings_return_positive_finite_numbers():
    c = ceilings.measure(n=64, bytes=4 * ceilings.MiB, repeats=2)
    for v in (c.matmul_flops, c.read_bytes_per_s, c.copy_bytes_per_s):
        assert v > 0 and math.isfinite(v)


def test_machine_info_fields():
    info = ceilings.machine_info()
    assert info["logical_cores"] >= 1 and info["torch_threads"] >= 1
    assert isinstance(info["aten_cpu_capability"], str) and info["aten_cpu_capability"]
    assert isinstance(info["cpu_model"], str)


def test_repeats_must_be_positive():
    with pytest.raises(LowbitError):
        ceilings.matmul_flops(n=8, repeats=0)
