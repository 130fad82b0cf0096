"""The replica pool: Ray actors that each own an AsyncEngine, their health, restarts and scaling.

Health has two signals, both cheap:
- a **watch** call kept pending on every replica (`EngineReplica.watch` never returns). Ray fails the
  in-flight calls of an actor whose process dies, so the watch fails the moment a replica dies,
  even when no request is running. Calls sent while Ray restarts an actor wait for the restart, so
  without this signal new requests would queue behind a model load instead of going elsewhere.
- a **report** every `poll_interval`: load and cache figures for /metrics, and the incarnation
  (node:pid:start time). A restarted replica answers with a new incarnation: it is routable again,
  and its old sessions are known to be gone (the router's epoch).

Ray restarts a dead replica up to `max_restarts` times; calls in flight when it dies are not retried
(`max_task_retries=0`), because replaying half a stream would repeat tokens: they fail with a 503.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..engine.args import EngineArgs
from ..errors import LowbitError
from .replica import EngineReplica, ReplicaInfo, ReplicaReport
from .router import Router

log = logging.getLogger("lowbit.cluster")


@dataclass
class ClusterConfig:
    replicas: int = 2
    threads_per_replica: int | None = None  # None: the Ray cluster's CPUs split evenly
    pin_cores: bool = False  # sched_setaffinity each replica to its own cores (one machine)
    max_restarts: int = 5  # per replica; -1: forever
    load_factor: float = 1.25  # prefix affinity yields once the owner is this far above the mean load
    routing: str = "affinity"  # or "random" (a baseline for benchmarks)
    prefix_blocks: int = 1  # prompt blocks hashed for prefix affinity
    poll_interval: float = 0.5  # seconds between load reports
    poll_timeout: float = 30.0  # a replica silent this long is taken out of routing
    start_timeout: float = 600.0  # for the first replicas to load the model
    drain_timeout: float = 300.0  # scale-down waits this long for a replica's requests

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise LowbitError(f"replicas must be >= 1, got {self.replicas}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise LowbitError(f"threads per replica must be >= 1, got {self.threads_per_replica}")
        if self.prefix_blocks < 1:
            raise LowbitError(f"prefix_blocks must be >= 1, got {self.prefix_blocks}")


@dataclass
class _Member:
    name: str
    index: int
    actor: Any
    watch: Any = None  # the pending watch call
    warming: Any = None  # the warm-up call; the replica takes no requests before it ends
    down: str | None = None  # the incarnation that died, until a new one answers
    poll: Any = None  # the pending report call
    poll_sent: float = 0.0


class ReplicaPool:
    """Starts the actors (ray must be initialized), keeps `router` told about their health."""

    def __init__(self, engine_args: EngineArgs, config: ClusterConfig, router: Router) -> None:
        import ray

        self._ray = ray
        self.engine_args = engine_args
        self.config = config
        self.router = router
        cpus = int(ray.cluster_resources().get("CPU", 0))
        self.threads = config.threads_per_replica or max(1, cpus // config.replicas)
        if config.replicas * self.threads > cpus:
            need = config.replicas * self.threads
            raise LowbitError(f"{config.replicas} replicas x {self.threads} threads need {need} CPUs; "
                              f"the Ray cluster has {cpus}")
        self._cls = ray.remote(EngineReplica)
        self._members: dict[str, _Member] = {}
        self._reports: dict[str, ReplicaReport] = {}
        self._lock = threading.Lock()
        self._next_index = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> ReplicaInfo:
        """Start the replicas, wait until all answer, and return the engine's info."""
        names = [self._spawn() for _ in range(self.config.replicas)]
        try:
            info = self._wait_ready(names)
        except BaseException:
            self.shutdown()
            raise
        self._thread = threading.Thread(target=self._poll_loop, name="lowbit-cluster-health", daemon=True)
        self._thread.start()
        return info

    def _spawn(self) -> str:
        with self._lock:
            index = self._next_index
            self._next_index += 1
        name = f"r{index}"
        cores = None
        if self.config.pin_cores:
            import os

            n = os.cpu_count() or 1
            cores = sorted({(index * self.threads + i) % n for i in range(self.threads)})
        actor = self._cls.options(num_cpus=self.threads, max_restarts=self.config.max_restarts, max_task_retries=0,
                                  max_concurrency=4096).remote(self.engine_args, self.threads, cores)
        member = _Member(name, index, actor)
        member.watch = actor.watch.remote()
        member.warming = actor.warmup.remote()
        with self._lock:
            self._members[name] = member
        self.router.add(name)
        return name

    def _wait_ready(self, names: list[str]) -> ReplicaInfo:
        ray = self._ray
        members = [self._members[n] for n in names]
        actors = [m.actor for m in members]
        sent = time.monotonic()
        try:
            ray.get([m.warming for m in members], timeout=self.config.start_timeout)
            for m in members:
                m.warming = None
            reports = ray.get([a.report.remote() for a in actors], timeout=self.config.start_timeout)
            info = ray.get(actors[0].info.remote(), timeout=self.config.start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise LowbitError(f"the replicas did not start within {self.config.start_timeout:.0f}s "
                              "(is the model loadable on every node, and are the CPUs free?)") from None
        except ray.exceptions.RayError as e:
            raise LowbitError(f"a replica failed to start: {_cause(e)}") from None
        for n, rep in zip(names, reports):
            self._record(n, rep, sent)
        return info

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            members = list(self._members.values())
            self._members.clear()
        for m in members:
            self._kill(m)
            self.router.remove(m.name)

    # ---- access --------------------------------------------------------------------------------
    def actor(self, name: str) -> Any:
        with self._lock:
            m = self._members.get(name)
        if m is None:
            raise LowbitError(f"replica {name!r} is gone")
        return m.actor

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._members, key=lambda n: self._members[n].index)

    def reports(self) -> dict[str, ReplicaReport]:
        with self._lock:
            return dict(self._reports)

    # ---- scaling ---------------------------------------------------------------------------------
    def add_replica(self) -> str:
        """Start one more replica; it takes requests once its first report arrives."""
        cpus = int(self._ray.cluster_resources().get("CPU", 0))
        if (len(self.names()) + 1) * self.threads > cpus:
            raise LowbitError(f"no room for another replica of {self.threads} threads ({cpus} CPUs in the cluster)")
        return self._spawn()

    def remove_replica(self, name: str, timeout: float | None = None) -> bool:
        """Drain: route nothing new to `name`, wait for its requests to finish (at most `timeout`),
        then stop it. Its idle sessions move (rebuilt) to other replicas on their next turn.
        Returns False if requests were still running at the deadline (they are then cut off)."""
        with self._lock:
            m = self._members.get(name)
        if m is None:
            raise LowbitError(f"replica {name!r} does not exist")
        self.router.drain(name)
        deadline = time.monotonic() + (self.config.drain_timeout if timeout is None else timeout)
        while self.router.in_flight(name) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        drained = self.router.in_flight(name) == 0
        with self._lock:
            self._members.pop(name, None)
            self._reports.pop(name, None)
        self._kill(m)
        self.router.remove(name)
        return drained

    def scale(self, n: int, timeout: float | None = None) -> list[str]:
        """Add or drain replicas (newest first) until there are `n`; returns the names now serving."""
        if n < 1:
            raise LowbitError(f"replicas must be >= 1, got {n}")
        while len(self.names()) < n:
            self.add_replica()
        while len(self.names()) > n:
            self.remove_replica(self.names()[-1], timeout)
        return self.names()

    # ---- health ----------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():  # each round waits up to poll_interval inside ray.wait
            try:
                self._poll_once()
            except Exception:  # never let the health thread die: routing depends on it
                log.exception("replica health poll failed")
                self._stop.wait(self.config.poll_interval)

    def _poll_once(self) -> None:
        ray = self._ray
        with self._lock:
            members = list(self._members.values())
        now = time.monotonic()
        for m in members:
            if m.poll is None:
                m.poll, m.poll_sent = m.actor.report.remote(), now
        pending = [m.poll for m in members] + [m.watch for m in members] + \
            [m.warming for m in members if m.warming is not None]
        if not pending:
            self._stop.wait(self.config.poll_interval)
            return
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=self.config.poll_interval)
        ready_set = set(ready)
        for m in members:
            if m.watch in ready_set:  # the watch never returns by itself: the process died
                if m.down is None:  # calls fail at once while Ray restarts it: report one death once
                    m.down = self._reports[m.name].incarnation if m.name in self._reports else "?"
                    log.warning("replica %s died; Ray restarts it (up to max_restarts)", m.name)
                    self.router.lost(m.name)
                m.watch = m.actor.watch.remote()
            if m.warming is not None:
                if m.warming not in ready_set:
                    continue  # still loading: not routable yet
                try:
                    ray.get(m.warming)
                except ray.exceptions.RayError as e:
                    log.warning("replica %s failed to warm up: %s", m.name, _cause(e))
                m.warming = None
            if m.poll in ready_set:
                ref, sent, m.poll = m.poll, m.poll_sent, None
                try:
                    rep = ray.get(ref)
                except ray.exceptions.RayError:
                    continue  # died: the watch says so
                if m.down is not None and rep.incarnation != m.down:
                    m.down = None
                self._record(m.name, rep, sent)
            elif time.monotonic() - m.poll_sent > self.config.poll_timeout:
                self.router.observe(m.name, None)  # silent: no new requests until it answers

    def _record(self, name: str, rep: ReplicaReport, sent: float) -> None:
        with self._lock:
            if name in self._members:
                self._reports[name] = rep
        self.router.observe(name, rep.incarnation, sent)

    def _kill(self, m: _Member) -> None:
        try:
            self._ray.kill(m.actor, no_restart=True)
        except Exception:  # already dead
            pass


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
