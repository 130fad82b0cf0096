"""p50 latency of a 576-float all-reduce between two local ranks: shared memory vs gloo.

    python benchmarks/bench_allreduce.py [--n 576] [--iters 2000] [--world 2]

Each rank is pinned to its own core with one thread (as the TP executor does). Prints one line
per path: p50 / p90 in microseconds.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed


def _rank(rank: int, world: int, port: int, shm_path: str | None, n: int, iters: int, q) -> None:
    from lowbit.distributed.group import TPGroup, init_torch_group
    from lowbit.distributed.shm_allreduce import ShmAllReduce

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, [cores[rank % len(cores)]])
    torch.set_num_threads(1)
    group, _ = init_torch_group(rank, world, "127.0.0.1", port, 60)
    shm = ShmAllReduce.attach(shm_path, rank, 60) if shm_path and rank else None
    results = {}
    for name in ("shm", "gloo"):
        if name == "shm" and shm_path is None:
            continue
        g = TPGroup(rank, world, group, (shm if rank else _DRIVER_SHM[0]) if name == "shm" else None, 60)
        x = torch.randn(n)
        times = []
        for i in range(iters + 200):
            t = time.perf_counter()
            g.all_reduce(x)
            times.append(time.perf_counter() - t)
            x.fill_(1.0)
        times = sorted(times[200:])
        results[name] = (times[len(times) // 2] * 1e6, times[int(len(times) * 0.9)] * 1e6)
    if rank == 0:
        q.put(results)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads stopped before the interpreter exits


_DRIVER_SHM: list = [None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=576)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args()
    from lowbit.distributed.shm_allreduce import ShmAllReduce
    from lowbit.engine.tp.placement import free_port

    ctx = torch.multiprocessing.get_context("spawn")
    shm = ShmAllReduce.create(a.world, 60)
    _DRIVER_SHM[0] = shm
    port = free_port()
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, a.world, port, shm.path if shm else None, a.n, a.iters, q), daemon=True)
             for r in range(1, a.world)]
    for p in procs:
        p.start()
    if shm is not None:
        shm.set_pids([os.getpid()] + [p.pid for p in procs])
    _rank(0, a.world, port, shm.path if shm else None, a.n, a.iters, q)
    res = q.get(timeout=120)
    for p in procs:
        p.join(30)
    if shm is not None:
        shm.close()
    for name, (p50, p90) in res.items():
        print(f"{name:5s} all-reduce of {a.n} floats, {a.world} local ranks: p50 {p50:7.1f} us  p90 {p90:7.1f} us")


if __name__ == "__main__":
    main()
