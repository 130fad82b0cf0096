"""TPGroup: what a tensor-parallel rank needs to talk to the others.

Row-parallel layers call `all_reduce` once per o_proj / down_proj; the driver calls
`broadcast_obj` once per engine step (TPDriver.run_step). Both go through a shared-memory segment between ranks of
one machine when there is one (shm_allreduce.py, microseconds) and through torch.distributed
(gloo) otherwise. Every failure (a peer died, a timeout) becomes one `CollectiveError`, so the
caller never sees a gloo stack trace and never waits forever.
"""
from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..errors import LowbitError

#: Seconds a collective waits for the other ranks before raising (LOWBIT_TP_TIMEOUT overrides).
DEFAULT_TIMEOUT = 60.0


class CollectiveError(LowbitError):
    """A tensor-parallel peer died, or a collective timed out."""


@dataclass
class TPGroup:
    """rank / world of this process; `group` the torch.distributed process group (None at world 1);
    `shm` the local shared-memory all-reduce when every rank is on this machine, else None."""

    rank: int
    world: int
    group: Any = None
    shm: Any = None
    timeout: float = DEFAULT_TIMEOUT
    step_group: Any = None  # the step broadcast's own gloo group (the driver's heartbeats use it too)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (every rank gets the sum); returns t."""
        if self.world == 1:
            return t
        if self.shm is not None:
            return self.shm.all_reduce(t)
        import torch.distributed as dist

        try:
            dist.all_reduce(t, group=self.group)
        except Exception as e:  # gloo raises RuntimeError / DistBackendError on a dead peer or timeout
            raise CollectiveError(f"tensor-parallel all-reduce failed on rank {self.rank}: {_short(e)}") from None
        return t

    def gather_to_driver(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Rank r's t [M, sizes[r]] -> on rank 0 their concatenation along dim 1; None elsewhere."""
        if self.world == 1:
            return t
        if self.shm is not None:
            return self.shm.gather(t, sizes)
        import torch.distributed as dist

        width = max(sizes)
        padded = torch.zeros(t.shape[0], width)
        padded[:, : t.shape[1]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        try:
            dist.gather(padded, parts, dst=0, group=self.group)
        except Exception as e:
            raise CollectiveError(f"tensor-parallel gather failed on rank {self.rank}: {_short(e)}") from None
        if parts is None:
            return None
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    def broadcast_obj(self, obj: Any = None) -> Any:
        """The driver's `obj` on every rank (workers pass nothing and get it back)."""
        if self.world == 1:
            return obj
        if self.shm is not None:
            return self.shm.broadcast_bytes(pickle.dumps(obj) if self.rank == 0 else None, decode=pickle.loads)
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.step_group or self.group)
        except Exception as e:
            raise CollectiveError(f"tensor-parallel broadcast failed on rank {self.rank}: {_short(e)}") from None
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.all_reduce(torch.zeros(1))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


HEARTBEAT = "lowbit-heartbeat"  # what an idle driver broadcasts on gloo so workers' waits never expire


_JOINED = "lowbit/joined"
#: Seconds the ranks may take to start and meet (the other nodes of a multi-node run included).
JOIN_TIMEOUT = 300.0


def init_torch_group(rank: int, world: int, addr: str, port: int, timeout: float,
                     on_wait: Callable[[], None] | None = None) -> tuple[Any, Any]:
    """(torch.distributed's default gloo group with `timeout`, a second group for the step
    broadcast, with the same deadline: an idle driver keeps it alive with heartbeats), or a one-line CollectiveError (port in use, a rank
    that never came, a bad address).

    Rank 0 hosts the TCPStore without blocking and waits in its own loop until every other rank
    checked in, calling on_wait() (which may raise: a worker that died) between polls; only then
    does anyone call init_process_group. So a failed start leaves no thread stuck in gloo.
    """
    import torch.distributed as dist

    where = f"tcp://{addr}:{port}"
    join = max(timeout, JOIN_TIMEOUT)  # starting an interpreter and torch takes longer than a collective
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timedelta(seconds=join),
                              wait_for_workers=False)
        if rank == 0:
            deadline = time.monotonic() + join
            while store.add(_JOINED, 0) < world - 1:
                if on_wait is not None:
                    on_wait()
                if time.monotonic() > deadline:
                    raise CollectiveError(f"tensor-parallel ranks did not all join {where} within {join:.0f} s")
                time.sleep(0.05)
        else:
            store.add(_JOINED, 1)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        steps = dist.new_group(list(range(world)), timeout=timedelta(seconds=timeout), backend="gloo")
    except LowbitError:
        raise
    except Exception as e:
        raise CollectiveError(f"rank {rank}: cannot join the tensor-parallel group at {where}: {_short(e)}") from None
    return dist.group.WORLD, steps


def leave_torch_group() -> None:
    """Destroys this process's torch.distributed groups, if any. A process that returns normally
    must do this before the interpreter exits: left to finalization, gloo's native threads are torn
    down unjoined and the process aborts ("terminate called without an active exception") after a
    clean stop. Never raises: a dead peer can make the teardown itself fail."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - nothing left to say goodbye to
        pass
