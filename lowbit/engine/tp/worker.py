"""A tensor-parallel worker: joins the group, loads its slice, then runs every step the driver
broadcasts until told to stop (None) or a peer fails.

Workers never outlive their parent: the kernel kills them when it dies (PR_SET_PDEATHSIG), and
a watcher thread covers the instant between fork and prctl. PR_SET_PDEATHSIG follows the parent
*thread* that started them, so the engine must live in the thread that built it (LLM: the
caller's; AsyncEngine: its own engine thread, for the server's lifetime). They ignore Ctrl-C: the terminal
sends SIGINT to the whole process group, and the driver, not each worker, decides how to stop.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from ...distributed.group import DEFAULT_TIMEOUT, HEARTBEAT, CollectiveError, TPGroup, init_torch_group
from ..args import EngineArgs
from .placement import Rendezvous, pin

_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSpec:
    local_rank: int
    rdzv: Rendezvous
    args: EngineArgs
    cores: list[int]
    parent_pid: int
    shm_name: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def rank(self) -> int:
        return self.rdzv.global_rank(self.local_rank)


def spawn_worker(ctx, spec: WorkerSpec):
    """Starts `spec`'s rank in a fresh interpreter (a torch.multiprocessing "spawn" context);
    returns (process, the read end of its pipe: "ready" or "error" messages)."""
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=worker_main, args=(spec, child), name=f"lowbit-tp-rank{spec.rank}", daemon=True)
    p.start()
    child.close()
    return p, parent


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent goes (Linux), plus a polling fallback elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="lowbit-parent-watch", daemon=True).start()


def join(spec: WorkerSpec) -> TPGroup:
    """This rank's TPGroup: the torch.distributed group, plus the local shared-memory path."""
    rank, world = spec.rank, spec.rdzv.world
    group, steps = init_torch_group(rank, world, spec.rdzv.master_addr, spec.rdzv.master_port, spec.timeout)
    shm = None
    if spec.shm_name is not None:
        from ...distributed.shm_allreduce import ShmAllReduce

        shm = ShmAllReduce.attach(spec.shm_name, spec.local_rank, spec.timeout)
    return TPGroup(rank, world, group, shm, spec.timeout, steps)


def worker_main(spec: WorkerSpec, conn) -> None:
    """The spawned process's entry point: exits 0 after a clean stop, 1 on any failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(spec.parent_pid)
    os._exit(run_rank(spec, conn))


def run_rank(spec: WorkerSpec, conn=None) -> int:
    """Join, load this rank's slice, report ready (or the error) on `conn`, serve the steps."""
    logging.basicConfig(level=logging.WARNING, format=f"lowbit rank {spec.rank}: %(message)s")
    try:
        if os.environ.get("LOWBIT_TP_FAIL_RANK") == str(spec.rank):  # fault injection for tests
            raise RuntimeError("LOWBIT_TP_FAIL_RANK asked this rank to fail")
        pin(spec.cores)
        group = join(spec)
        from ...quant.loader import load_model
        from ..model_shard import ModelShard, model_nbytes

        loaded = load_model(spec.args.model, with_tokenizer=False, tp=group)
        shard = ModelShard(spec.args, loaded)
        if conn is not None:
            conn.send(("ready", spec.rank, model_nbytes(shard.model), shard.pool.nbytes(), shard.spec.num_kv_heads))
    except BaseException as e:  # noqa: BLE001 - reported to the driver as one line
        msg = f"rank {spec.rank} failed to start: {type(e).__name__}: {e}"
        if conn is not None:
            _report(conn, msg)
        print(f"lowbit: {msg}", file=sys.stderr, flush=True)
        return 1
    return serve(shard, group)


def serve(shard, group: TPGroup) -> int:
    """Runs the driver's steps until a None (0) or a failure (1, the reason on stderr)."""
    try:
        while True:
            step = group.broadcast_obj()
            if step is None:
                return 0
            if isinstance(step, str) and step == HEARTBEAT:
                continue
            shard.run(step)
    except CollectiveError as e:
        print(f"lowbit: {e}", file=sys.stderr, flush=True)
    except BaseException as e:  # noqa: BLE001 - a worker must never hang its peers: exit
        print(f"lowbit: rank {group.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return 1


def _report(conn, msg: str) -> None:
    try:
        conn.send(("error", msg.splitlines()[0][:500]))
    except (OSError, ValueError):
        pass
