"""Where each rank runs: its cores, its threads, and how the ranks find each other.

Why pin: ranks share the machine's cores; with every rank running torch's default thread count
they oversubscribe (N ranks x C threads on C cores) and a decode step waits on the slowest
descheduled thread of each all-reduce. Each rank gets C/N cores of its own and as many threads.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ...errors import LowbitError


@dataclass(frozen=True)
class Rendezvous:
    """How ranks meet: `nnodes` machines each running `world // nnodes` local ranks, this
    process's node `node_rank`; the group's address is master_addr:master_port."""

    world: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def local_world(self) -> int:
        return self.world // self.nnodes

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.local_world + local_rank

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def rendezvous_from(world: int, nnodes: int, node_rank: int, master_addr: str | None,
                    master_port: int | None) -> Rendezvous:
    """Explicit flags first, then torchrun's env:// variables (MASTER_ADDR, MASTER_PORT, and
    NNODES / NODE_RANK or GROUP_RANK), then one machine on a free loopback port."""
    env = os.environ
    nnodes, node_rank = nodes_from_env(nnodes, node_rank)
    addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    port = master_port or int(env.get("MASTER_PORT", "0") or 0)
    if nnodes < 1 or world % nnodes:
        raise LowbitError(f"tensor_parallel_size {world} must be a multiple of nnodes {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise LowbitError(f"node_rank {node_rank} must be in [0, {nnodes})")
    if nnodes > 1 and not port:
        raise LowbitError("multi-node tensor parallelism needs --master-port (or MASTER_PORT)")
    if not port:
        port = free_port(addr)
    return Rendezvous(world, nnodes, node_rank, addr, port)


def nodes_from_env(nnodes: int, node_rank: int) -> tuple[int, int]:
    """(nnodes, node_rank): the flags where given (nnodes > 1, node_rank > 0), else torchrun's
    NNODES (PET_NNODES) and NODE_RANK (GROUP_RANK)."""
    env = os.environ
    if nnodes <= 1:
        nnodes = int(env.get("NNODES", env.get("PET_NNODES", "1")) or 1)
    if node_rank == 0:
        node_rank = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")) or 0)
    return nnodes, node_rank


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def check_port_free(addr: str, port: int) -> None:
    """One-line error when the driver's rendezvous port is taken (gloo would say it much later)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if addr in ("0.0.0.0", "") else addr, port))
        except OSError as e:
            raise LowbitError(f"tensor-parallel port {addr}:{port} is not available ({e.strerror})") from None


def cores_for(local_rank: int, local_world: int, cores: list[int] | None = None) -> list[int]:
    """This rank's share of the cores the process may use (C/N each; every rank at least one)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    n = len(cores)
    if n < local_world:
        return [cores[local_rank % n]]
    per = n // local_world
    return cores[local_rank * per : (local_rank + 1) * per]


def pin(cores: list[int]) -> None:
    import torch

    try:
        os.sched_setaffinity(0, cores)
    except OSError:  # containers may forbid it; threads still split
        pass
    torch.set_num_threads(len(cores))
