"""Start or join Ray and bring up the replicas (`lowbit serve --replicas N` / `--ray-address`).

Without an address, a local Ray instance is started with this machine's cores and stopped when the
server stops. With `--ray-address auto|HOST:PORT`, lowbit joins a running cluster (`ray start --head`
on one node, `ray start --address HEAD:6379` on the others) and leaves it running afterwards; every
node needs lowbit installed and the model reachable at the same path or hub id.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from ..engine.args import EngineArgs
from ..errors import LowbitError
from .replicas import ClusterConfig


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LowbitError("--replicas and --ray-address need Ray: pip install 'lowbit[cluster]'") from None
    return ray


def start_cluster(engine_args: EngineArgs, config: ClusterConfig, address: str | None = None) -> Any:
    """A ClusterEngine whose replicas are running; its shutdown() also stops a Ray it started."""
    ray = import_ray()
    from .engine import ClusterEngine

    started = False
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LowbitError(f"cannot join the Ray cluster at {address!r}: {e}") from None
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
            started = True
    try:
        engine = ClusterEngine.start(engine_args, config)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if started:
        engine.after_shutdown = ray.shutdown
    return engine


def config_from_args(args: Any) -> ClusterConfig:
    """ClusterConfig from `lowbit serve`'s flags (--threads sets the per-replica default)."""
    return ClusterConfig(
        replicas=args.replicas or 1,
        threads_per_replica=args.threads_per_replica or args.threads,
        pin_cores=args.pin_cores,
        max_restarts=args.max_restarts,
        prefix_blocks=args.route_prefix_blocks,
        routing=args.routing,
    )
