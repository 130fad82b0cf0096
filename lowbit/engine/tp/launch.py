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
from multiprocessing.connection import wait as mp_wait

import torch

from ...distributed.group import DEFAULT_TIMEOUT, CollectiveError, TPGroup, init_torch_group
from ...errors import LowbitError
from ..args import EngineArgs
from .placement import Rendezvous, check_port_free, cores_for, pin, rendezvous_from
from .worker import WorkerSpec, worker_main

log = logging.getLogger("lowbit.engine")

#: Seconds a worker may take to load its slice and report ready.
STARTUP_TIMEOUT = 600.0


class TPDeadError(LowbitError):
    """A tensor-parallel rank failed: the engine cannot run any more steps."""


def timeout_from_env() -> float:
    return float(os.environ.get("LOWBIT_TP_TIMEOUT", DEFAULT_TIMEOUT))


def shm_enabled(rdzv: Rendezvous) -> bool:
    """The shared-memory path: all ranks on this machine, and not switched off (LOWBIT_TP_SHM=0)."""
    return rdzv.nnodes == 1 and os.environ.get("LOWBIT_TP_SHM", "1") != "0"


class TPDriver:
    def __init__(self, args: EngineArgs, rdzv: Rendezvous) -> None:
        self.rdzv = rdzv
        self.timeout = timeout_from_env()
        self.dead: str | None = None
        self.procs: list = []
        self.conns: list = []
        self.shm = None
        self._saved = (os.sched_getaffinity(0), torch.get_num_threads())
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        try:
            self._start(args)
        except BaseException:
            self.dead = "startup failed"
            self.close()
            raise

    def _start(self, args: EngineArgs) -> None:
        rdzv = self.rdzv
        L = rdzv.local_world
        if shm_enabled(rdzv):
            from ...distributed.shm_allreduce import ShmAllReduce

            self.shm = ShmAllReduce.create(L, self.timeout)
        ctx = torch.multiprocessing.get_context("spawn")
        cores = sorted(os.sched_getaffinity(0))
        for local in range(1, L):
            spec = WorkerSpec(local, rdzv, args, cores_for(local, L, cores), os.getpid(),
                              None if self.shm is None else self.shm.name, self.timeout)
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker_main, args=(spec, child), name=f"lowbit-tp-rank{spec.rank}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        if self.shm is not None:
            self.shm.set_pids([os.getpid()] + [p.pid for p in self.procs])
        pin(cores_for(0, L, cores))
        group, steps = self._join()
        self.group = TPGroup(0, rdzv.world, group, self.shm, self.timeout, steps)

    def _join(self):
        """init_process_group on a helper thread while the workers are watched."""
        box: dict = {}

        def init() -> None:
            try:
                box["group"] = init_torch_group(self.rdzv.global_rank(0), self.rdzv.world, self.rdzv.init_method,
                                                self.timeout)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        t = threading.Thread(target=init, name="lowbit-tp-join", daemon=True)
        t.start()
        deadline = time.monotonic() + self.timeout
        while t.is_alive():
            t.join(0.05)
            self._check_workers(starting=True)
            if time.monotonic() > deadline:
                raise CollectiveError(f"tensor-parallel ranks did not all join {self.rdzv.init_method} "
                                      f"within {self.timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["group"]

    def _check_workers(self, starting: bool = False) -> None:
        """A dead worker -> its own one-line error if it sent one, else its exit code."""
        for p, c in zip(self.procs, self.conns):
            if not p.is_alive():
                if c.poll():
                    msg = c.recv()
                    if msg[0] == "error":
                        raise LowbitError(msg[1])
                what = "failed to start" if starting else "died"
                raise LowbitError(f"tensor-parallel {p.name} {what} (exit code {p.exitcode})")

    def wait_ready(self) -> None:
        """Blocks until every worker loaded its slice; one-line LowbitError if one cannot."""
        ready: dict[int, tuple] = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pending = list(zip(self.procs, self.conns))
        while pending:
            if time.monotonic() > deadline:
                raise LowbitError(f"tensor-parallel workers not ready after {STARTUP_TIMEOUT:.0f} s")
            mp_wait([c for _, c in pending] + [p.sentinel for p, _ in pending], timeout=1.0)
            still = []
            for p, c in pending:
                if c.poll():
                    msg = c.recv()
                    if msg[0] == "error":
                        raise LowbitError(msg[1])
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
        if self.shm is not None:
            self.shm.unlink()  # every rank has it mapped: nothing left in /dev/shm after a crash

    def broadcast_step(self, inputs) -> None:
        if self.dead is not None:
            raise TPDeadError(self.dead)
        try:
            self.group.broadcast_obj(inputs)
        except CollectiveError as e:
            self.fail(str(e))

    def fail(self, reason: str) -> None:
        """Marks the engine dead, stops the workers, raises TPDeadError."""
        for p in self.procs:
            if not p.is_alive() and p.exitcode not in (0, None):
                reason = f"tensor-parallel {p.name} died (exit code {p.exitcode}); {reason}"
                break
        self.dead = reason
        _stop(self.procs, self.conns, graceful=False)
        raise TPDeadError(reason)

    def close(self) -> None:
        """Stops every worker (a clean None step when the group is healthy) and gives the process
        back its cores and threads."""
        if self.dead is None and self.procs:
            try:
                self.group.broadcast_obj(None)
            except (CollectiveError, AttributeError):
                pass
            self.dead = "the engine was closed"
        _stop(self.procs, self.conns)
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown itself fail
            pass
        affinity, threads = self._saved
        try:
            os.sched_setaffinity(0, affinity)
        except OSError:
            pass
        torch.set_num_threads(threads)


def _stop(procs: list, conns: list, graceful: bool = True) -> None:
    """Joins (graceful) then terminates, then kills the workers: none is left behind."""
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
