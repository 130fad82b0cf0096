"""The driver side of tensor parallelism: start the local workers, join the group, broadcast
each step, and turn any failure into one clear error plus a clean stop of every rank.

Startup order: the driver checks its port, creates the shared-memory segment, spawns ranks
1..L-1 (torch.multiprocessing "spawn": a fresh interpreter, no forked threads or locks), then
joins the process group while watching the workers, so a worker that dies before joining is a
one-line error now rather than a gloo timeout later. Each worker then loads its own slice and
reports "ready" (with its resident bytes) or its error over a pipe.

After a failure (a rank killed, a timeout) the driver is `dead`: every later step raises
TPDeadError at once, and the remaining workers are terminated (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait as mp_wait
from typing import Any

import torch

from ...distributed.group import (DEFAULT_TIMEOUT, HEARTBEAT, CollectiveError, TPGroup, init_torch_group,
                                 leave_torch_group)
from ...errors import EngineDeadError, LowbitError
from ..args import EngineArgs
from .placement import Rendezvous, check_port_free, cores_for, pin, rendezvous_from
from .worker import WorkerSpec, spawn_worker

log = logging.getLogger("lowbit.engine")

#: Seconds a worker may take to load its slice and report ready.
STARTUP_TIMEOUT = 600.0


class TPDeadError(EngineDeadError):
    """A tensor-parallel rank failed: the engine cannot run any more steps."""


def timeout_from_env() -> float:
    return float(os.environ.get("LOWBIT_TP_TIMEOUT", DEFAULT_TIMEOUT))


def shm_enabled(rdzv: Rendezvous) -> bool:
    """The shared-memory path: all ranks on this machine, and not switched off (LOWBIT_TP_SHM=0)."""
    return rdzv.nnodes == 1 and os.environ.get("LOWBIT_TP_SHM", "1") != "0"


class _Ranks:
    """What stopping the workers needs, kept apart from the driver so a weakref finalizer (run at
    garbage collection or interpreter exit) can stop them without keeping the driver alive."""

    def __init__(self) -> None:
        self.procs: list = []
        self.conns: list = []
        self.group: TPGroup | None = None
        self.shm = None
        self.dead: str | None = None
        self.stopped = threading.Event()  # set by shutdown; wakes the heartbeat thread at once
        self.heartbeat: threading.Thread | None = None
        self.in_step = False  # a step was broadcast and has not finished (Ctrl-C inside it)
        self.lock = threading.Lock()  # one broadcast at a time on the step group (steps, heartbeats, stop)
        self.saved = (os.sched_getaffinity(0), torch.get_num_threads())

    @property
    def closing(self) -> bool:
        return self.stopped.is_set()

    def shutdown(self) -> None:
        """A clean None step when the group is healthy, then join / terminate / kill; gives the
        process back its cores and threads."""
        self.stopped.set()
        if self.heartbeat is not None and self.heartbeat is not threading.current_thread():
            # joined, so no thread of ours still holds the process group when it is destroyed below
            # (or when the interpreter exits: a daemon thread woken during finalization aborts it)
            self.heartbeat.join(5.0)
        if self.in_step and self.dead is None:  # the ranks are inside a step: no clean stop message
            self.dead = "interrupted during a step"
        if self.dead is None and self.group is not None and self.group.world > 1:
            try:
                with self.lock:
                    self.group.broadcast_obj(None)
            except CollectiveError:
                pass
        if self.dead is None:
            self.dead = "the engine was closed"
        _stop(self.procs, self.conns)
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        leave_torch_group()
        affinity, threads = self.saved
        try:
            os.sched_setaffinity(0, affinity)
        except OSError:
            pass
        torch.set_num_threads(threads)


class TPDriver:
    def __init__(self, args: EngineArgs, rdzv: Rendezvous) -> None:
        self.rdzv = rdzv
        self.timeout = timeout_from_env()
        self.ranks = _Ranks()
        self._last_broadcast = time.monotonic()
        self._finalizer = weakref.finalize(self, self.ranks.shutdown)
        try:
            self._start(args)
        except BaseException:
            self.ranks.dead = "startup failed"
            self.close()
            raise

    @property
    def dead(self) -> str | None:
        return self.ranks.dead

    @property
    def shm(self):
        return self.ranks.shm

    @property
    def procs(self) -> list:
        return self.ranks.procs

    def _start(self, args: EngineArgs) -> None:
        rdzv, ranks = self.rdzv, self.ranks
        L = rdzv.local_world
        if shm_enabled(rdzv):
            from ...distributed.shm_allreduce import ShmAllReduce

            ranks.shm = ShmAllReduce.create(L, self.timeout)
        ctx = torch.multiprocessing.get_context("spawn")
        cores = sorted(os.sched_getaffinity(0))
        for local in range(1, L):
            spec = WorkerSpec(local, rdzv, args, cores_for(local, L, cores), os.getpid(),
                              None if ranks.shm is None else ranks.shm.name, self.timeout)
            p, parent = spawn_worker(ctx, spec)
            ranks.procs.append(p)
            ranks.conns.append(parent)
        if ranks.shm is not None:
            ranks.shm.set_pids([os.getpid()] + [p.pid for p in ranks.procs])
        pin(cores_for(0, L, cores))
        group, steps = self._join()
        self.group = ranks.group = TPGroup(0, rdzv.world, group, ranks.shm, self.timeout, steps)
        if ranks.shm is None:  # gloo: every wait has a deadline, so an idle driver must say it is alive
            ranks.heartbeat = threading.Thread(target=self._heartbeat, name="lowbit-tp-heartbeat", daemon=True)
            ranks.heartbeat.start()

    def _heartbeat(self) -> None:
        """Every timeout/4 without a step, broadcast a heartbeat on the step group (serialized with
        the steps by the broadcast lock), so a worker's wait for the next step never expires while
        the driver lives, yet a hung driver or worker is still noticed within the timeout."""
        ranks, period = self.ranks, self.timeout / 4
        while not ranks.stopped.wait(period):
            with self.ranks.lock:
                if ranks.dead is not None or ranks.closing:
                    return
                if time.monotonic() - self._last_broadcast < period:
                    continue
                try:
                    self.group.broadcast_obj(HEARTBEAT)
                    self._last_broadcast = time.monotonic()
                except CollectiveError as e:
                    ranks.dead = str(e)
                    return

    def _join(self):
        """init_process_group as rank 0, watching the workers while the others check in."""
        return init_torch_group(self.rdzv.global_rank(0), self.rdzv.world, self.rdzv.master_addr,
                                self.rdzv.master_port, self.timeout, on_wait=lambda: self._check_workers(starting=True))

    def _check_workers(self, starting: bool = False) -> None:
        """A dead worker -> its own one-line error if it sent one, else its exit code."""
        for p, c in zip(self.ranks.procs, self.ranks.conns):
            if not p.is_alive():
                if c.poll():
                    _message(c)
                what = "failed to start" if starting else "died"
                raise LowbitError(f"tensor-parallel {p.name} {what} (exit code {p.exitcode})")

    def wait_ready(self) -> None:
        """Blocks until every local worker loaded its slice; one-line LowbitError if one cannot."""
        ready: dict[int, tuple] = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pending = list(zip(self.ranks.procs, self.ranks.conns))
        while pending:
            if time.monotonic() > deadline:
                raise LowbitError(f"tensor-parallel workers not ready after {STARTUP_TIMEOUT:.0f} s")
            mp_wait([c for _, c in pending] + [p.sentinel for p, _ in pending], timeout=1.0)
            still = []
            for p, c in pending:
                if c.poll():
                    msg = _message(c)
                    ready[msg[1]] = msg[2:]
                elif not p.is_alive():
                    raise LowbitError(f"tensor-parallel {p.name} failed to start (exit code {p.exitcode})")
                else:
                    still.append((p, c))
            pending = still
        for rank in sorted(ready):
            weights, pool, heads = ready[rank]
            log.info("rank %d/%d: weights %.1f MiB resident, KV pool %.1f MiB (%d KV heads)",
                     rank, self.rdzv.world, weights / 2**20, pool / 2**20, heads)
        self.worker_report = ready
        if self.ranks.shm is not None:
            self.ranks.shm.unlink()  # every rank has it mapped: nothing left in /dev/shm after a crash

    def watch(self, on_death) -> None:
        """Calls on_death(reason) from a helper thread as soon as a local worker dies (an idle
        server learns it at once, not at its next step). Clean stops are not reported."""
        procs, ranks = list(self.ranks.procs), self.ranks

        def run() -> None:
            live = list(procs)
            while live:
                mp_wait([p.sentinel for p in live])
                for p in [p for p in live if not p.is_alive()]:
                    live.remove(p)
                    if ranks.closing or p.exitcode == 0:
                        continue
                    reason = f"tensor-parallel {p.name} died (exit code {p.exitcode})"
                    if ranks.dead is None:
                        ranks.dead = reason
                    on_death(reason)
                    return

        threading.Thread(target=run, name="lowbit-tp-watch", daemon=True).start()

    def run_step(self, fn: Callable[[Any], Any], inputs) -> Any:
        """Broadcasts the step to every rank, then runs fn(inputs) here as rank 0; a rank that dies
        or times out on the way (CollectiveError) stops them all (TPDeadError)."""
        if self.ranks.dead is not None:
            raise TPDeadError(self.ranks.dead)
        self.ranks.in_step = True
        try:
            with self.ranks.lock:
                self.group.broadcast_obj(inputs)
                self._last_broadcast = time.monotonic()
            out = fn(inputs)
        except CollectiveError as e:
            self.fail(str(e))
        self.ranks.in_step = False
        return out

    def fail(self, reason: str) -> None:
        """Marks the engine dead, stops the workers, raises TPDeadError."""
        for p in self.ranks.procs:
            if not p.is_alive() and p.exitcode not in (0, None):
                reason = f"tensor-parallel {p.name} died (exit code {p.exitcode}); {reason}"
                break
        self.ranks.dead = reason
        _stop(self.ranks.procs, self.ranks.conns, graceful=False)
        raise TPDeadError(reason)

    def close(self) -> None:
        self._finalizer()  # runs ranks.shutdown once


def _message(conn) -> tuple:
    """A worker's next message; its one-line startup error raised as a LowbitError."""
    msg = conn.recv()
    if msg[0] == "error":
        raise LowbitError(msg[1])
    return msg


def _stop(procs: list, conns: list, graceful: bool = True) -> None:
    """Joins (graceful: they were sent a stop) then terminates, then kills the workers: none is
    left behind."""
    end = time.monotonic() + (3.0 if graceful else 0.0)
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for c in conns:
        c.close()
    procs.clear()
    conns.clear()


def start_tensor_parallel(args: EngineArgs) -> TPDriver:
    """Starts ranks 1..N-1 of this machine and joins the group as rank 0 (the driver)."""
    rdzv = rendezvous_from(args.tensor_parallel_size, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if rdzv.node_rank != 0:
        raise LowbitError(f"node {rdzv.node_rank} hosts workers only: run it with `lowbit tp-node` (see docs/parallel.md)")
    check_port_free(rdzv.master_addr, rdzv.master_port)
    return TPDriver(args, rdzv)
