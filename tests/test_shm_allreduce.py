"""The shared-memory all-reduce between ranks of one machine (lowbit/distributed/shm_allreduce.py):
the compiled path (kernels/csrc/ops/shm.cpp) and the Python path give bit-identical rank-ordered sums,
a late peer falls back to the checked wait, and a dead peer is an error, not a hang. Two ranks are two
ShmAllReduce objects on one segment, driven from two threads (the compiled spin releases the GIL)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from lowbit.distributed import shm_allreduce as S
from lowbit.distributed.group import CollectiveError



def pair(timeout: float = 10.0):
    a = S.ShmAllReduce.create(2, timeout)
    if a is None:
        pytest.skip("no /dev/shm")
    b = S.ShmAllReduce.attach(a.path, 1, timeout)
    a.unlink()
    return a, b


def reduce_both(a, b, xa, xb, delay_b: float = 0.0):
    err = []

    def run_b():
        try:
            time.sleep(delay_b)
            b.all_reduce(xb)
        except Exception as e:  # noqa: BLE001 - re-raised by the test
            err.append(e)

    t = threading.Thread(target=run_b)
    t.start()
    a.all_reduce(xa)
    t.join(30)
    assert not t.is_alive() and not err, err


@pytest.mark.parametrize("n", [1, 576, 1000, 70_000])
def test_sums_are_rank_ordered_and_identical_on_every_path(monkeypatch, kernel_impl, n):
    g = torch.Generator().manual_seed(n)
    x0, x1 = torch.randn(n, generator=g) * 1e3, torch.randn(n, generator=g) * 1e-3
    want = x0 + x1  # rank order: slot 0 + slot 1
    a, b = pair()
    try:
        for _ in range(3):  # both banks, and back to the first
            xa, xb = x0.clone(), x1.clone()
            reduce_both(a, b, xa, xb)
            assert torch.equal(xa, want) and torch.equal(xb, want)
    finally:
        a.close()
        b.close()


def test_a_late_peer_goes_through_the_checked_wait(monkeypatch, isa):
    monkeypatch.setattr(S, "_EXT_SPINS", 1)
    a, b = pair()
    try:
        xa, xb = torch.ones(576), torch.full((576,), 2.0)
        reduce_both(a, b, xa, xb, delay_b=0.05)
        assert torch.equal(xa, torch.full((576,), 3.0)) and torch.equal(xb, xa)
        # gather and broadcast (Python path) still line up with the compiled all-reduce's sequence numbers
        out = []
        t = threading.Thread(target=lambda: out.append(b.broadcast_bytes(None)))
        t.start()
        assert a.broadcast_bytes(b"step") == b"step"
        t.join(10)
        assert out == [b"step"]
    finally:
        a.close()
        b.close()


def test_a_dead_peer_is_an_error(isa):
    a, b = pair(timeout=30.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        a.set_pids([0, dead.pid])
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match="died"):
            a.all_reduce(torch.ones(576))
        assert time.monotonic() - t0 < 5
    finally:
        a.close()
        b.close()
