"""A machine other than node 0 in a multi-node tensor-parallel run: it hosts ranks only.

`lowbit serve ... -tp 4 --nnodes 2 --node-rank 1 --master-addr A --master-port P` on the second
machine lands here (lowbit/cli.py): this process becomes the node's first rank, spawns the
node's other ranks, and serves the driver's steps until the driver stops them. Shared memory
is not used between nodes (nor, for simplicity, inside a worker node): gloo carries everything.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from ...distributed.group import leave_torch_group
from ...errors import LowbitError
from ..args import EngineArgs
from .launch import timeout_from_env
from .placement import cores_for, nodes_from_env, rendezvous_from
from .worker import WorkerSpec, run_rank, spawn_worker


def effective_node_rank(node_rank: int, nnodes: int) -> int:
    """--node-rank, else torchrun's NODE_RANK / GROUP_RANK when the run spans machines."""
    if node_rank:
        return node_rank
    nnodes, env_rank = nodes_from_env(nnodes, 0)
    return env_rank if nnodes > 1 else 0


def run_node(args: EngineArgs) -> int:
    """Hosts this node's ranks until the driver stops them: 0 after a clean stop, 1 otherwise."""
    rdzv = rendezvous_from(args.tensor_parallel_size, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if rdzv.node_rank == 0:
        raise LowbitError("node 0 runs the engine itself, not run_node")
    timeout = timeout_from_env()
    cores = sorted(os.sched_getaffinity(0))
    ctx = torch.multiprocessing.get_context("spawn")
    procs = []
    for local in range(1, rdzv.local_world):
        spec = WorkerSpec(local, rdzv, args, cores_for(local, rdzv.local_world, cores), os.getpid(), None, timeout)
        procs.append(spawn_worker(ctx, spec)[0])
    print(f"lowbit: node {rdzv.node_rank}/{rdzv.nnodes}: ranks {rdzv.global_rank(0)}..{rdzv.global_rank(rdzv.local_world - 1)}"
          f" joining {rdzv.init_method}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = run_rank(WorkerSpec(0, rdzv, args, cores_for(0, rdzv.local_world, cores), os.getppid(), None, timeout))
    finally:
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        leave_torch_group()  # a clean exit, not an abort in gloo's teardown (ranks spawned here use os._exit)
    return code if all(p.exitcode == 0 for p in procs) else max(code, 1)

