"""ClusterEngine: the AsyncEngine interface over a pool of replicas.

The serve layer's OpenAI app only needs an engine with `generate`, `abort`, `end_session`, `stats`,
`tokenizer`, `model_config`, `max_model_len` and `args`. Giving it this facade reuses all of it at the
ingress unchanged: request parsing and validation, chat templates and tokenization, errors, SSE,
API key and body limits, latency metrics, and the chat-session store. That store keeps every
session's messages and token ids at the ingress, which is what lets a session whose replica died be
rebuilt on another one: the next turn's prompt is the whole conversation either way.

Each `generate` call is routed (router.py), streamed from the chosen replica's actor, and its deltas
rebuilt into cumulative RequestOutputs. All calls made while serving one HTTP request go to the same
replica (a /v1/completions batch of prompts included), so `x-lowbit-replica` names exactly one.
"""
from __future__ import annotations

import collections
import contextvars
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ..engine.llm_engine import EngineStats
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from ..errors import LowbitError
from ..serve.errors import APIError
from .replica import OutputAssembler, ReplicaInfo
from .replicas import ClusterConfig, ReplicaPool
from .router import NoReplicaError, Route, Router, prefix_key


@dataclass
class RouteNote:
    """One HTTP request's routing decision, shared between the ingress middleware (which turns it
    into headers) and the generate calls that make it. A mutable object in a ContextVar: tasks the
    handler spawns copy the context, so they see (and fill) the same note."""

    arrival: float = field(default_factory=time.monotonic)
    route: Route | None = None
    on_decided: Callable[[], None] | None = None

    def decide(self, route: Route) -> None:
        self.route = route
        if self.on_decided is not None:
            self.on_decided()


current_note: contextvars.ContextVar[RouteNote | None] = contextvars.ContextVar("lowbit_route_note", default=None)


class ClusterEngine:
    """Build with `ClusterEngine.start(engine_args, config)` (Ray must be initialized)."""

    def __init__(self, pool: ReplicaPool, info: ReplicaInfo) -> None:
        import ray

        self._ray = ray
        self.pool = pool
        self.router = pool.router
        self.config = pool.config
        self.tokenizer = info.tokenizer
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.block_size = info.block_size
        # the ingress's session store spans all replicas: each holds up to max_sessions
        self.args = dataclasses.replace(info.args, max_sessions=info.args.max_sessions * pool.config.replicas)
        self._requests: dict[str, str] = {}  # request id -> replica, while running
        self.overheads: collections.deque[float] = collections.deque(maxlen=8192)  # seconds, newest last
        self.on_overhead: Callable[[float], None] | None = None  # the ingress's histogram
        self.after_shutdown: Callable[[], None] | None = None  # e.g. stop the Ray instance we started

    @classmethod
    def start(cls, engine_args: Any, config: ClusterConfig, router: Router | None = None) -> "ClusterEngine":
        router = router or Router(load_factor=config.load_factor, policy=config.routing)
        pool = ReplicaPool(engine_args, config, router)
        return cls(pool, pool.start())

    # ---- the AsyncEngine interface -------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
                       session_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if isinstance(prompt, str):
            prompt = list(self.tokenizer.encode(prompt))
        params = params if params is not None else SamplingParams()
        note = current_note.get()
        route = self._route(note, prompt, session_id)
        name = route.replica
        ray = self._ray
        asm = OutputAssembler(request_id, prompt)
        finished = False
        self._requests[request_id] = name
        try:
            actor = self.pool.actor(name)
            stream = actor.generate.remote(prompt, params, request_id, session_id)
            async for ref in stream:
                out = asm.apply(await ref)
                finished = out.finished
                yield out
                if finished:
                    break
        except ray.exceptions.RayTaskError as e:  # the replica raised: bad input or an engine error
            cause = e.cause
            if isinstance(cause, (LowbitError, ValueError)):
                raise LowbitError(str(cause)) from None
            raise APIError(500, f"replica {name} failed this request ({type(cause).__name__}: {cause})") from None
        except (ray.exceptions.RayError, LowbitError) as e:  # the actor died or went away mid-request
            self.router.lost(name)
            raise APIError(503, f"replica {name} became unavailable during this request ({type(e).__name__}); "
                                "it is being restarted, retry the request", code="replica_unavailable") from None
        finally:
            self._requests.pop(request_id, None)
            self.router.finished(name)
            if not finished:
                self._abort_on(name, request_id)
            else:
                start = note.arrival if note is not None else None
                if start is not None:
                    self._record_overhead(time.monotonic() - start - asm.replica_seconds)

    async def abort(self, request_id: str) -> None:
        name = self._requests.get(request_id)
        if name is not None:
            self._abort_on(name, request_id)

    def end_session(self, session_id: str) -> bool:
        """Forget the session's placement and tell its replica to drop it. Does not wait for the
        replica (this is called on the event loop, e.g. when the ingress expires sessions)."""
        name = self.router.forget_session(session_id)
        if name is None:
            return False
        try:
            self.pool.actor(name).end_session.remote(session_id)
        except Exception:  # replica gone: so is the session
            pass
        return True

    def stats(self) -> EngineStats:
        """All replicas' last reports summed (kv_usage is the pooled fraction)."""
        reps = [r.stats for r in self.pool.reports().values()]
        summed: dict[str, Any] = {f.name: sum(getattr(s, f.name) for s in reps) for f in dataclasses.fields(EngineStats)
                                  if f.name not in ("kv_usage", "kv_cache_dtype")}
        total, free = summed["num_total_blocks"], summed["num_free_blocks"]
        return EngineStats(**summed, kv_usage=(total - free) / total if total else 0.0,
                           kv_cache_dtype=reps[0].kv_cache_dtype if reps else str(self.args.kv_cache_dtype))

    def shutdown(self) -> None:
        self.pool.shutdown()
        if self.after_shutdown is not None:
            self.after_shutdown()
            self.after_shutdown = None

    close = shutdown

    # ---- internals -----------------------------------------------------------------------------
    def _route(self, note: RouteNote | None, prompt: list[int], session_id: str | None) -> Route:
        try:
            if note is not None and note.route is not None:  # a later call of the same HTTP request
                route = self.router.take(note.route.replica, note.route.reason)
                if route is not None:
                    return route
            key = prefix_key(prompt, self.block_size, self.config.prefix_blocks)
            route = self.router.route(session_id, key)
        except NoReplicaError as e:
            raise APIError(503, str(e), code="no_replica_available") from None
        if note is not None and note.route is None:
            note.decide(route)
        return route

    def _abort_on(self, name: str, request_id: str) -> None:
        try:
            self.pool.actor(name).abort.remote(request_id)  # fire and forget: frees its KV blocks
        except Exception:  # replica gone: nothing left to free
            pass

    def _record_overhead(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.overheads.append(seconds)
        if self.on_overhead is not None:
            self.on_overhead(seconds)
