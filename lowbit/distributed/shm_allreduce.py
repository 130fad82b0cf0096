"""All-reduce and broadcast between the ranks of one machine through a /dev/shm segment.

Why not gloo for these: a decode step of the default model all-reduces a 576-float vector 60
times; gloo's loopback TCP round trip costs tens of microseconds each, more than the layer's own
matmul at TP=2. Here each rank writes its contribution into its own slot of a shared segment,
publishes a sequence number, spins until every rank published the same number, and sums the
slots in rank order (so every rank gets bit-identical sums).

Layout: N 64-byte flag lines (one int64 sequence number each, a cache line apiece so ranks do
not false-share), then two banks of N slots. Operation s uses bank s % 2: a rank can be at most
one operation ahead of the slowest (it cannot pass op s+1 before everyone published s+1, which
they do only after reading op s), so the bank it overwrites is never still being read.
The ordering needs x86's total store order (data stores become visible before the flag store);
a port to a weaker memory model needs fences here.

Waiting: a spin, checking every few thousand turns the deadline and whether every peer is still
alive (a rank killed with -9 is noticed in milliseconds, not at the timeout), and backing off to
short sleeps after 50 ms so idle ranks do not burn their cores. The segment's file is unlinked
as soon as every rank has attached, so a crash leaves nothing in /dev/shm.

The all-reduce of one slot's worth (every decode-step all-reduce) runs compiled where the kernels
are (ops/shm.cpp: copy, publish, `pause` spin and the rank-ordered sum in one call without the GIL);
only a wait longer than about a millisecond comes back to the Python loop for its checks. Same slots,
same flags, same order of additions: the two paths give bit-identical sums and can be mixed.
"""
from __future__ import annotations

import mmap
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import kernels
from .group import CollectiveError

SHM_DIR = "/dev/shm"
FLAG_LINE = 64
#: Bytes of one rank's slot in one bank; larger tensors go through in chunks of this size.
SLOT_BYTES = 4 << 20
_SPIN_CHECK = 2048  # spins between deadline / liveness checks
_BACKOFF_AFTER = 0.05  # seconds of spinning before sleeping between checks
#: `pause` turns the compiled all-reduce spins before it returns to Python's checks (~1 ms or less).
_EXT_SPINS = 20000


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


class ShmAllReduce:
    def __init__(self, path: str, world: int, rank: int, timeout: float, fd: int) -> None:
        self.path, self.world, self.rank, self.timeout = path, world, rank, timeout
        size = _segment_bytes(world)
        self._mm = mmap.mmap(fd, size)
        os.close(fd)
        base = np.frombuffer(self._mm, dtype=np.int64, count=world * FLAG_LINE // 8)
        self.flags = base[:: FLAG_LINE // 8]  # one int64 per rank, a cache line apart
        self.pids = np.frombuffer(self._mm, dtype=np.int64, count=world, offset=world * FLAG_LINE)
        data_off = _data_offset(world)
        floats = SLOT_BYTES // 4
        self.banks = [torch.frombuffer(self._mm, dtype=torch.float32, count=world * floats,
                                       offset=data_off + b * world * SLOT_BYTES).view(world, floats) for b in range(2)]
        self._bytes_off = [data_off + b * world * SLOT_BYTES for b in range(2)]  # rank 0's slot, as bytes
        # raw addresses for the compiled all-reduce, taken once (numpy's .ctypes builds an object per read)
        self._flags_addr = self.flags.ctypes.data
        self._bank_addrs = [bank.data_ptr() for bank in self.banks]
        self.seq = 0
        self._view_cache: dict[int, list] = {}
        self._peer = 1 - rank if world == 2 else None

    @property
    def name(self) -> str:
        return self.path

    # ---------------------------------------------------------------- setup
    @classmethod
    def create(cls, world: int, timeout: float) -> "ShmAllReduce | None":
        """The driver's segment (rank 0), or None where /dev/shm is not available."""
        if not os.path.isdir(SHM_DIR):
            return None
        path = os.path.join(SHM_DIR, f"lowbit-tp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, _segment_bytes(world))
        except OSError:
            return None
        return cls(path, world, 0, timeout, fd)

    @classmethod
    def attach(cls, path: str, rank: int, timeout: float) -> "ShmAllReduce":
        fd = os.open(path, os.O_RDWR)
        world = os.fstat(fd).st_size
        world = next(w for w in range(1, 1025) if _segment_bytes(w) == world)
        return cls(path, world, rank, timeout, fd)

    def set_pids(self, pids: list[int]) -> None:
        """The driver records every rank's pid, so a spinning rank can tell a dead peer."""
        self.pids[:] = pids

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.rank == 0:
            self.unlink()
        self.banks = self._bank_addrs = []  # a call after close fails in Python, not on unmapped memory
        self._view_cache.clear()
        self.flags = self.pids = None
        try:
            self._mm.close()
        except BufferError:  # a tensor view still alive: the mapping goes with the process
            pass

    # ---------------------------------------------------------------- collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks, in place (fp32, contiguous; other tensors via a copy)."""
        flat = t.view(-1) if t.is_contiguous() and t.dtype == torch.float32 else t.reshape(-1).float()
        floats = SLOT_BYTES // 4
        total = flat.numel()
        ext = kernels.OPS.get()
        if ext is not None and total <= floats and t.is_contiguous() and t.dtype == torch.float32:
            self._all_reduce_ext(ext, flat, floats)
            return t
        for a in range(0, total, floats):
            part = flat if total <= floats else flat[a : a + floats]
            mine, parts = self._views(part.numel())[(self.seq + 1) % 2]
            mine.copy_(part)
            self._publish_and_wait(timeout=self.timeout)
            if len(parts) == 2:
                torch.add(parts[0], parts[1], out=part)
            else:
                part.copy_(parts[0])
                for p in parts[1:]:  # rank order: every rank adds in the same order
                    part.add_(p)
        if flat.data_ptr() != t.data_ptr() or flat.dtype != t.dtype:
            t.copy_(flat.view_as(t))
        return t

    def _all_reduce_ext(self, ext, flat: torch.Tensor, floats: int) -> None:
        """The compiled path (kernels/csrc/ops/shm.cpp): copy, publish, spin and sum in one call without
        the GIL; only a wait longer than _EXT_SPINS comes back here for the deadline and liveness checks."""
        self.seq += 1
        seq = self.seq
        flags, bank = self._flags_addr, self._bank_addrs[seq % 2]
        if not ext.shm_all_reduce(flat, flags, bank, floats, self.world, self.rank, seq, _EXT_SPINS, True):
            self._wait(seq, self.timeout)
            ext.shm_all_reduce(flat, flags, bank, floats, self.world, self.rank, seq, 0, False)

    def _views(self, n: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per bank: (this rank's slot, every rank's slot) over the first n floats; cached per size
        (a decode step reuses one or two sizes), since slicing costs more than a 576-float copy."""
        v = self._view_cache.get(n)
        if v is None:
            v = [(bank[self.rank, :n], [bank[r, :n] for r in range(self.world)]) for bank in self.banks]
            if len(self._view_cache) > 64:
                self._view_cache.clear()
            self._view_cache[n] = v
        return v

    def gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Rank r's t [M, sizes[r]] -> on rank 0 the concatenation [M, sum(sizes)] along dim 1
        (every other rank gets None). Rows go through in chunks that fit a slot."""
        t = t.to(torch.float32).contiguous()
        M, width = t.shape[0], max(sizes)
        rows_per = max(1, (SLOT_BYTES // 4) // max(1, width))
        out = t.new_empty(M, sum(sizes)) if self.rank == 0 else None
        starts = [sum(sizes[:r]) for r in range(self.world)]
        for a in range(0, max(M, 1), rows_per):
            part = t[a : a + rows_per]
            n = part.numel()
            bank = self.banks[(self.seq + 1) % 2]
            bank[self.rank, :n].copy_(part.reshape(-1))
            self._publish_and_wait(timeout=self.timeout)
            if out is not None:
                m = part.shape[0]
                for r in range(self.world):
                    out[a : a + m, starts[r] : starts[r] + sizes[r]] = bank[r, : m * sizes[r]].view(m, sizes[r])
        return out

    def broadcast_bytes(self, data: bytes | None, decode: Callable[[bytes], Any] = bytes) -> Any:
        """Rank 0's bytes on every rank (decoded). Workers wait without a deadline: an idle server
        sends no steps for hours; a dead driver or peer is still noticed."""
        out = bytearray()
        total = None
        while total is None or len(out) < total:
            bank_off = self._bytes_off[(self.seq + 1) % 2]
            if self.rank == 0:
                if total is None:
                    total = len(data)
                chunk = data[len(out) : len(out) + SLOT_BYTES - 8]
                self._mm[bank_off : bank_off + 8] = total.to_bytes(8, "little")
                self._mm[bank_off + 8 : bank_off + 8 + len(chunk)] = chunk
                self._publish_and_wait(timeout=self.timeout)
                out += chunk
            else:
                self._publish_and_wait(timeout=None)
                total = int.from_bytes(self._mm[bank_off : bank_off + 8], "little")
                n = min(total - len(out), SLOT_BYTES - 8)
                out += self._mm[bank_off + 8 : bank_off + 8 + n]
        return decode(bytes(out))

    def _publish_and_wait(self, timeout: float | None) -> None:
        self.seq += 1
        seq, flags = self.seq, self.flags
        flags[self.rank] = seq
        if self._peer is not None and flags[self._peer] >= seq:  # two ranks: one scalar read
            return
        self._wait(seq, timeout)

    def _wait(self, seq: int, timeout: float | None) -> None:
        """Until every rank published seq: a spin with deadline and liveness checks, then back-off."""
        flags = self.flags
        if flags.min() >= seq:
            return
        start = time.monotonic()
        spins = 0
        while flags.min() < seq:
            spins += 1
            if spins % _SPIN_CHECK:
                continue
            now = time.monotonic()
            self._check_peers()
            if timeout is not None and now - start > timeout:
                late = [r for r in range(self.world) if flags[r] < seq]
                raise CollectiveError(f"tensor-parallel collective timed out after {timeout:.0f} s on rank "
                                      f"{self.rank} (waiting for rank(s) {late})")
            if now - start > _BACKOFF_AFTER:
                time.sleep(0.0005)

    def _check_peers(self) -> None:
        for r in range(self.world):
            pid = int(self.pids[r])
            if r != self.rank and pid and not _alive(pid):
                raise CollectiveError(f"tensor-parallel rank {r} (pid {pid}) died")


def _data_offset(world: int) -> int:
    head = world * FLAG_LINE + world * 8
    return (head + 4095) // 4096 * 4096


def _segment_bytes(world: int) -> int:
    return _data_offset(world) + 2 * world * SLOT_BYTES
