"""Which replica takes a request: session affinity, then prefix affinity, then the less loaded of two.

Pure logic with no Ray in it, so it is unit-tested alone; the ingress calls `route()` once per HTTP
request and `finished()` when that request ends. A lock guards the state because the health poller
(a thread) marks replicas up and down while the event loop routes.

Why this order:
1. **Session affinity.** A session's KV cache lives on one replica; any other replica would prefill the
   whole history again. So a session goes where it went last, whatever the load. If that replica is
   gone (died, restarted, draining), the turn goes elsewhere by the rules below and the route says
   `rebuilt_from`: the ingress still holds the conversation, so the new replica prefills it all
   (slower, never wrong).
2. **Prefix affinity.** Requests whose first full KV block is the same (same hash as the engine's prefix
   cache uses for that block) are sent to the same replica, where that prefix is probably cached. The
   owner is found by consistent hashing, so adding or losing a replica moves only its share of keys.
   It uses *bounded loads* (Mirrokni, Thorup, Zadimoghaddam 2018): the owner takes the request only
   while its load stays within `load_factor` x the mean, otherwise the next replica on the ring does.
   Without the bound one hot prefix (a chat template's default system prompt is the same first block
   for every chat) would send all traffic to one replica.
3. **Power of two choices** on load otherwise: nearly as even as least-loaded, without herding.

Load is the number of requests this ingress has dispatched to a replica and not yet seen finish,
which is that replica's running + waiting count as of now. The replicas' own reports of running +
waiting arrive once per poll; routing a burst of 64 requests on such a stale figure would send them
all to whichever replica looked idle, so the reports serve metrics and health, not routing.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..engine.block_manager import block_hash
from ..errors import LowbitError

SESSION = "session"
PREFIX = "prefix"
LOAD = "load"
RANDOM = "random"
POLICIES = ("affinity", "random")  # random: a uniform pick per request, the baseline for benchmarks


class NoReplicaError(LowbitError):
    """No replica can take a request right now (all dead, starting or draining)."""


def prefix_key(prompt_ids: list[int], block_size: int, blocks: int = 1) -> bytes | None:
    """Hash of the first `blocks` full KV blocks of a prompt, chained like the engine's prefix cache;
    None when the prompt has no full block that the engine could reuse (it always recomputes the
    last prompt token, so a prompt needs more than one block's worth of tokens)."""
    n = min(blocks, (len(prompt_ids) - 1) // block_size)
    if n < 1:
        return None
    h = b""
    for i in range(n):
        h = block_hash(h, prompt_ids[i * block_size:(i + 1) * block_size])
    return h


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass
class ReplicaState:
    name: str
    alive: bool = False  # answered its last health check (False while starting or restarting)
    draining: bool = False  # takes no new requests; removed once its in-flight ones end
    epoch: int = 0  # bumped whenever the replica loses its KV state (death, restart)
    incarnation: str | None = None  # the process last seen answering (node, pid, start time)
    lost_at: float = -math.inf  # when a request saw it die; older health answers cannot revive it
    in_flight: int = 0  # requests dispatched by this ingress and not finished
    routed: dict[str, int] = field(default_factory=dict)  # requests routed here, by reason

    @property
    def routable(self) -> bool:
        return self.alive and not self.draining


@dataclass(frozen=True)
class Route:
    replica: str
    reason: str  # session | prefix | load
    rebuilt_from: str | None = None  # the replica that held this session's state, now gone


@dataclass
class _SessionEntry:
    replica: str
    epoch: int


class Router:
    """Routing state for one ingress. `vnodes` points per replica on the hash ring keep each
    replica's share of prefixes even; `max_sessions` bounds the session table (LRU)."""

    def __init__(self, *, load_factor: float = 1.25, vnodes: int = 64, max_sessions: int = 65536,
                 rng: random.Random | None = None, policy: str = "affinity") -> None:
        if load_factor < 1.0:
            raise LowbitError(f"load_factor must be >= 1, got {load_factor}")
        if policy not in POLICIES:
            raise LowbitError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.load_factor = load_factor
        self.vnodes = vnodes
        self.max_sessions = max_sessions
        self.rng = rng or random.Random()
        self.replicas: dict[str, ReplicaState] = {}
        self._ring: list[tuple[int, str]] = []
        self._ring_points: list[int] = []
        self._sessions: OrderedDict[str, _SessionEntry] = OrderedDict()
        self._lock = threading.Lock()

    # ---- membership and health -----------------------------------------------------------------
    def add(self, name: str) -> None:
        with self._lock:
            if name in self.replicas:
                raise LowbitError(f"replica {name!r} already exists")
            self.replicas[name] = ReplicaState(name)
            self._rebuild_ring()

    def remove(self, name: str) -> None:
        with self._lock:
            if self.replicas.pop(name, None) is not None:
                self._rebuild_ring()

    def observe(self, name: str, incarnation: str | None, sent_at: float | None = None) -> None:
        """A health check sent at `sent_at` (monotonic) found the replica answering as process
        `incarnation`, or not answering (None). A new incarnation means a restart: its sessions
        are gone. The same incarnation revives a replica marked lost only if it answered a check
        sent after the loss (an answer already in flight proves nothing)."""
        with self._lock:
            r = self.replicas.get(name)
            if r is None:
                return
            if incarnation is None:
                r.alive = False
                return
            if r.incarnation is not None and incarnation != r.incarnation:
                r.epoch += 1
            elif incarnation == r.incarnation and (sent_at if sent_at is not None else time.monotonic()) < r.lost_at:
                return
            r.incarnation = incarnation
            r.alive = True

    def lost(self, name: str) -> None:
        """A request saw the replica die: route nothing there until a check proves it alive, and
        treat its sessions as gone."""
        with self._lock:
            r = self.replicas.get(name)
            if r is not None:
                r.alive = False
                r.epoch += 1
                r.lost_at = time.monotonic()

    def drain(self, name: str) -> None:
        with self._lock:
            r = self.replicas.get(name)
            if r is not None:
                r.draining = True

    def in_flight(self, name: str) -> int:
        with self._lock:
            r = self.replicas.get(name)
            return r.in_flight if r is not None else 0

    # ---- routing -------------------------------------------------------------------------------
    def route(self, session_id: str | None = None, key: bytes | None = None) -> Route:
        """Pick a replica and count the request on it (call finished() when it ends)."""
        with self._lock:
            live = [r for r in self.replicas.values() if r.routable]
            if not live:
                raise NoReplicaError("no replica is available right now (starting, restarting or draining); "
                                     "retry shortly")
            if self.policy == RANDOM:
                return self._count(self.rng.choice(live), RANDOM, None)
            rebuilt_from = None
            if session_id is not None:
                entry = self._sessions.get(session_id)
                if entry is not None:
                    r = self.replicas.get(entry.replica)
                    if r is not None and r.routable and r.epoch == entry.epoch:
                        self._sessions.move_to_end(session_id)
                        return self._count(r, SESSION, None)
                    rebuilt_from = entry.replica
            r, reason = self._by_prefix(key, live)
            if r is None:
                r, reason = self._least_of_two(live), LOAD
            if session_id is not None:
                self._sessions[session_id] = _SessionEntry(r.name, r.epoch)
                self._sessions.move_to_end(session_id)
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            return self._count(r, reason, rebuilt_from)

    def take(self, name: str, reason: str) -> Route | None:
        """Count one more request on `name` if it can take it (a later call of an HTTP request
        already routed there); None if it cannot, and the call is routed afresh."""
        with self._lock:
            r = self.replicas.get(name)
            return self._count(r, reason, None) if r is not None and r.routable else None

    def finished(self, name: str) -> None:
        with self._lock:
            r = self.replicas.get(name)
            if r is not None and r.in_flight > 0:
                r.in_flight -= 1

    def session_replica(self, session_id: str) -> str | None:
        with self._lock:
            entry = self._sessions.get(session_id)
            return entry.replica if entry is not None else None

    def forget_session(self, session_id: str) -> str | None:
        """Drop a session's mapping; returns the replica that held it."""
        with self._lock:
            entry = self._sessions.pop(session_id, None)
            return entry.replica if entry is not None else None

    def snapshot(self) -> dict[str, ReplicaState]:
        """Copies of every replica's state (status pages and metrics)."""
        with self._lock:
            return {n: dataclasses.replace(r, routed=dict(r.routed)) for n, r in self.replicas.items()}

    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ---- internals (lock held) -----------------------------------------------------------------
    def _count(self, r: ReplicaState, reason: str, rebuilt_from: str | None) -> Route:
        r.in_flight += 1
        r.routed[reason] = r.routed.get(reason, 0) + 1
        return Route(r.name, reason, rebuilt_from)

    def _rebuild_ring(self) -> None:
        ring = sorted((_point(f"{name}#{i}".encode()), name) for name in self.replicas for i in range(self.vnodes))
        self._ring = ring
        self._ring_points = [p for p, _ in ring]

    def _by_prefix(self, key: bytes | None, live: list[ReplicaState]) -> tuple[ReplicaState | None, str]:
        """The first routable replica clockwise from the key's point whose load stays within the
        bound ceil(load_factor * (total + 1) / live) after taking this request."""
        if key is None or not self._ring:
            return None, LOAD
        total = sum(r.in_flight for r in live)
        cap = math.ceil(self.load_factor * (total + 1) / len(live))
        start = bisect.bisect(self._ring_points, _point(key))
        seen: set[str] = set()
        for i in range(len(self._ring)):
            name = self._ring[(start + i) % len(self._ring)][1]
            if name in seen:
                continue
            seen.add(name)
            r = self.replicas[name]
            if r.routable and r.in_flight + 1 <= cap:
                return r, PREFIX
            if len(seen) == len(self.replicas):
                break
        return None, LOAD

    def _least_of_two(self, live: list[ReplicaState]) -> ReplicaState:
        if len(live) == 1:
            return live[0]
        a, b = self.rng.sample(live, 2)
        if a.in_flight == b.in_flight:
            return a  # sample() already randomized the order
        return a if a.in_flight < b.in_flight else b
