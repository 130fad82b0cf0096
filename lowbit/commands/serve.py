"""`lowbit serve`: the OpenAI-compatible HTTP server (drop-in for `vllm serve` clients)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
import time

from ..errors import LowbitError
from .engine_flags import add_engine_args, add_model_arg, engine_args_from, parse_bytes

API_KEY_ENV = "LOWBIT_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every API route (default: ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the --model argument, or smollm2-135m)")
    p.add_argument("--max-body-bytes", type=parse_bytes, default=8 * 2**20,
                   help="largest accepted request body (default 8MiB)")
    p.add_argument("--allowed-origins", nargs="+", default=["*"], metavar="ORIGIN",
                   help="CORS origins allowed to call the API from a browser (default: any, as vLLM)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request (costs CPU under load)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(p)
    c = p.add_argument_group("replicas (Ray; needs pip install 'lowbit[cluster]', see docs/cluster.md)")
    c.add_argument("--replicas", type=int, default=None,
                   help="serve N engine replicas behind this endpoint, on a local Ray instance")
    c.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="join this Ray cluster instead of starting one (implies replicas, default 1)")
    c.add_argument("--threads-per-replica", type=int, default=None,
                   help="torch threads per replica (default: --threads, else the cluster's CPUs split evenly)")
    c.add_argument("--pin-cores", action="store_true", help="pin each replica to its own cores (one machine)")
    c.add_argument("--max-restarts", type=int, default=5, help="Ray restarts of a dead replica (-1: forever)")
    c.add_argument("--route-prefix-blocks", type=int, default=1,
                   help="prompt KV blocks hashed for prefix-affinity routing (default %(default)s)")
    c.add_argument("--routing", choices=["affinity", "random"], default="affinity",
                   help="session, then prefix, then load (default); random is a baseline for benchmarks")
    p.set_defaults(func=run)


def served_name(model: str | None) -> str:
    from ..models.default import DEFAULT_MODEL_NAME
    from ..models.loader import DEFAULT_ALIASES

    if model is None or model in DEFAULT_ALIASES:
        return DEFAULT_MODEL_NAME
    return model.rstrip("/") or model


def check_port_free(host: str, port: int) -> None:
    """Fail in a second, before the model loads, if we could not listen anyway."""
    if not (0 < port < 65536):
        raise LowbitError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LowbitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine.async_engine import AsyncEngine
    from ..serve.app import create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_port_free(args.host, args.port)
    if not _is_loopback(args.host) and api_key is None:
        print(f"lowbit serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"port can use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    make_app = create_app
    if (args.replicas is not None or args.ray_address is not None) and args.tensor_parallel_size > 1:
        raise LowbitError("--replicas / --ray-address with --tensor-parallel-size > 1 is not supported yet")
    if args.replicas is not None or args.ray_address is not None:  # only then is Ray imported
        from ..cluster.ingress import create_cluster_app
        from ..cluster.launch import config_from_args, start_cluster

        engine = start_cluster(engine_args_from(args), config_from_args(args), args.ray_address)
        make_app = create_cluster_app
    else:
        engine = AsyncEngine(engine_args_from(args))
    name = args.served_model_name or served_name(args.model)
    app = make_app(engine, served_model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                   model_root=str(args.model) if args.model else None, allowed_origins=args.allowed_origins)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lowbit serve: {name} on http://{shown}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key'}); Ctrl-C to stop", file=sys.stderr, flush=True)
    dead = getattr(engine, "dead", None)
    if dead is not None:
        threading.Thread(target=_stop_when_dead, args=(dead,), name="lowbit-dead-watch", daemon=True).start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                    timeout_graceful_shutdown=5)
    finally:
        shutdown = getattr(engine, "shutdown", None) or getattr(engine, "close", None)
        if callable(shutdown):
            shutdown()
    if dead is not None and dead.is_set():
        print("lowbit serve: error: the engine died (a tensor-parallel rank failed); exiting", file=sys.stderr)
        return 1
    return 0


#: Seconds a server whose engine died keeps answering 503 before it exits (non-zero).
DEAD_GRACE = 2.0


def _stop_when_dead(dead: threading.Event) -> None:
    """Once the engine is dead, new requests get 503 for DEAD_GRACE seconds, then the server stops
    as Ctrl-C would (uvicorn's SIGINT handler) and the command exits 1."""
    dead.wait()
    time.sleep(DEAD_GRACE)
    os.kill(os.getpid(), signal.SIGINT)
