"""The ingress: `lowbit serve`'s OpenAI app over a ClusterEngine, plus what only a cluster has.

- Routing headers on every response: `x-lowbit-replica` (the replica that served it, or `none`),
  `x-lowbit-route` (session | prefix | load) and, when a session had to move because its replica
  was gone, `x-lowbit-session-rebuilt: <old replica>`.
- /metrics: the engine families get one sample per replica (label `replica`), plus routing counts,
  replica health and the ingress's own overhead per request.
- GET /cluster/replicas (status, JSON) and POST /cluster/scale (add replicas, or drain and stop them);
  both behind the API key like every non-public route.

Headers before the decision: a streamed chat response starts (and yields its role chunk) before the
handler asks the engine for tokens, which is when the replica is chosen. So the middleware holds the
response start and any early chunks until the route is decided (or the response ends), then sends
them with the headers; the held chunks go out the moment the route is known, not at the first token.
"""
from __future__ import annotations

import asyncio
import statistics
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from ..errors import LowbitError
from ..serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from ..serve.errors import APIError
from ..serve.metrics import PREFIX, EngineCollector, ServerMetrics
from .engine import ClusterEngine, RouteNote, current_note

OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                    0.5, 1.0, 2.5)


def route_headers(note: RouteNote) -> list[tuple[bytes, bytes]]:
    r = note.route
    if r is None:
        return [(b"x-lowbit-replica", b"none")]
    out = [(b"x-lowbit-replica", r.replica.encode()), (b"x-lowbit-route", r.reason.encode())]
    if r.rebuilt_from is not None:
        out.append((b"x-lowbit-session-rebuilt", r.rebuilt_from.encode()))
    return out


class _HeaderSender:
    """Wraps one response's `send`: holds its start (and early body chunks) until the note has a
    route or the body ends, then sends them with the routing headers."""

    def __init__(self, send: Any, note: RouteNote) -> None:
        self.send = send
        self.note = note
        self.start: dict | None = None
        self.held: list[dict] = []
        self.open = False
        self.lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    async def __call__(self, msg: dict) -> None:
        async with self.lock:
            if self.open:
                await self.send(msg)
            elif msg["type"] == "http.response.start":
                self.start = msg
            elif msg["type"] == "http.response.body" and self.start is not None:
                self.held.append(msg)
                if self.note.route is not None or not msg.get("more_body", False):
                    await self._flush()
            else:
                await self.send(msg)

    def wake(self) -> None:
        """The route was just decided (called on the event loop): release what is held."""
        if not self.open and self.held:
            self._task = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        async with self.lock:
            if not self.open and self.start is not None:
                await self._flush()

    async def _flush(self) -> None:
        start = dict(self.start or {})
        start["headers"] = list(start.get("headers", [])) + route_headers(self.note)
        self.open = True
        await self.send(start)
        held, self.held = self.held, []
        for m in held:
            await self.send(m)


class RouteHeaderMiddleware:
    """Pure ASGI (keeps the ContextVar visible to the handler): one RouteNote per HTTP request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = RouteNote()
        sender = _HeaderSender(send, note)
        note.on_decided = sender.wake
        token = current_note.set(note)
        try:
            await self.app(scope, receive, sender)
        finally:
            current_note.reset(token)
            if not sender.open and sender.held:
                await sender.flush()


class ReplicaCollector(EngineCollector):
    """The engine families with one sample per replica, plus the cluster's own families."""

    def __init__(self, cluster: ClusterEngine, model_name: str) -> None:
        super().__init__(cluster, model_name)
        self.cluster = cluster

    def snapshots(self) -> list[tuple[list[str], list[str], Any]]:
        reports = self.cluster.pool.reports()
        return [(["model_name", "replica"], [self.model_name, n], reports[n].stats)
                for n in self.cluster.pool.names() if n in reports]

    def collect(self) -> Any:
        yield from super().collect()
        lbl = ["model_name", "replica"]
        up = GaugeMetricFamily(PREFIX + "replica_up", "1 if the replica takes requests (alive, not draining).",
                               labels=lbl)
        flight = GaugeMetricFamily(PREFIX + "replica_in_flight", "Requests the ingress has running on the replica.",
                                   labels=lbl)
        restarts = CounterMetricFamily(PREFIX + "replica_state_losses", "Times the replica lost its KV state "
                                       "(died or restarted).", labels=lbl)
        held = GaugeMetricFamily(PREFIX + "replica_session_blocks", "KV blocks held by idle sessions.", labels=lbl)
        routed = CounterMetricFamily(PREFIX + "routed_requests", "Requests routed to the replica, by reason.",
                                     labels=lbl + ["reason"])
        reports = self.cluster.pool.reports()
        for name, r in sorted(self.cluster.router.snapshot().items()):
            val = [self.model_name, name]
            up.add_metric(val, float(r.routable))
            flight.add_metric(val, float(r.in_flight))
            restarts.add_metric(val, float(r.epoch))
            if name in reports:
                held.add_metric(val, float(reports[name].session_blocks))
            for reason, n in sorted(r.routed.items()):
                routed.add_metric(val + [reason], float(n))
        yield from (up, flight, restarts, held, routed)


class ScaleRequest(BaseModel):
    replicas: int = Field(..., ge=1, le=1024)
    drain_timeout: float | None = Field(None, ge=0)


def create_cluster_app(cluster: ClusterEngine, *, served_model_name: str, api_key: str | None = None,
                       max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_root: str | None = None,
                       allowed_origins: tuple[str, ...] | list[str] = ("*",)) -> FastAPI:
    app = create_app(cluster, served_model_name=served_model_name, api_key=api_key, max_body_bytes=max_body_bytes,
                     model_root=model_root, allowed_origins=allowed_origins)
    state = app.state.lowbit
    metrics = ServerMetrics(cluster, served_model_name, collector=ReplicaCollector(cluster, served_model_name))
    overhead = Histogram(PREFIX + "ingress_overhead_seconds", "Per request: time at the ingress minus time in the "
                         "replica (HTTP, parsing, tokenizing, routing, Ray transfers).", ["model_name"],
                         buckets=OVERHEAD_BUCKETS, registry=metrics.registry).labels(served_model_name)
    cluster.on_overhead = overhead.observe
    state.metrics = metrics
    app.add_middleware(RouteHeaderMiddleware)  # added last = outermost: sees every response

    @app.get("/cluster/replicas")
    async def replicas() -> dict:
        return cluster_status(cluster)

    @app.post("/cluster/scale")
    async def scale(req: ScaleRequest, request: Request) -> dict:
        try:
            names = await run_in_threadpool(cluster.pool.scale, req.replicas, req.drain_timeout)
        except LowbitError as e:
            raise APIError(400, str(e), param="replicas") from None
        return {"replicas": names}

    return app


def cluster_status(cluster: ClusterEngine) -> dict:
    reports = cluster.pool.reports()
    rows = []
    for name, r in sorted(cluster.router.snapshot().items()):
        rep = reports.get(name)
        row: dict[str, Any] = {"name": name, "alive": r.alive, "draining": r.draining, "epoch": r.epoch,
                               "in_flight": r.in_flight, "routed": dict(r.routed), "incarnation": r.incarnation}
        if rep is not None:
            s = rep.stats
            row.update(pid=rep.pid, node=rep.node, threads=rep.threads, cores=rep.cores,
                       num_running=s.num_running, num_waiting=s.num_waiting, num_free_blocks=s.num_free_blocks,
                       num_total_blocks=s.num_total_blocks, session_blocks=rep.session_blocks,
                       num_sessions=s.num_sessions, generating=rep.generating,
                       prefix_cache_hit_rate=s.prefix_cache_hits / s.prefix_cache_queries
                       if s.prefix_cache_queries else 0.0)
        rows.append(row)
    over = list(cluster.overheads)
    return {"replicas": rows, "sessions": cluster.router.num_sessions(),
            "ingress_overhead": {"count": len(over), "p50": statistics.median(over) if over else None}}
