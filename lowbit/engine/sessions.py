"""Stateful sessions (LMDeploy's interactive mode): keep a conversation's KV cache between turns.

After a turn finishes, its session keeps the turn's token ids and holds references on the KV blocks
that cover them. The next turn's prompt (the whole conversation) is matched against those tokens;
the longest common prefix is reused and only the rest is prefilled. A mismatching prompt or a
session whose blocks were evicted just reuses less (down to nothing): slower, never wrong.

While a turn runs, its sequence owns the blocks (the session hands them over at admission), so a
busy session holds nothing. Idle sessions are evicted LRU when the pool runs short, expire after
`ttl` idle seconds, and there are at most `max_sessions`.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import LowbitError
from .block_manager import BlockManager, ReusePlan
from .sequence import Sequence


@dataclass
class Session:
    session_id: str
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V the blocks hold
    blocks: list[int] = field(default_factory=list)  # references held while idle
    last_used: float = field(default_factory=time.monotonic)
    busy: str | None = None  # request id of the turn in flight


class SessionManager:
    def __init__(self, block_manager: BlockManager, ttl: float, max_sessions: int) -> None:
        self.bm = block_manager
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    # ---- turns ---------------------------------------------------------------------------------
    def begin_turn(self, session_id: str, request_id: str) -> Session:
        """Mark the session busy with a new turn (creating it, within max_sessions)."""
        s = self.sessions.get(session_id)
        if s is None:
            if len(self.sessions) >= self.max_sessions:
                idle = next((x for x in self.sessions.values() if x.busy is None), None)
                if idle is None:
                    raise LowbitError(f"too many active sessions (max_sessions={self.max_sessions})")
                self.end(idle.session_id)
            s = self.sessions[session_id] = Session(session_id)
        elif s.busy is not None:
            raise LowbitError(f"session {session_id!r} is busy with request {s.busy!r}; wait for it to finish")
        s.busy = request_id
        self._touch(s)
        return s

    def plan(self, session_id: str | None, request_id: str, token_ids: list[int]) -> ReusePlan:
        """Reusable K/V for turn `request_id`: the longest common prefix of its tokens with the
        session's, keeping at least one token to compute."""
        s = self.sessions.get(session_id) if session_id is not None else None
        if s is None or not s.blocks or s.busy != request_id:
            return ReusePlan()
        limit = min(len(s.token_ids), len(token_ids) - 1)
        n = 0
        while n < limit and s.token_ids[n] == token_ids[n]:
            n += 1
        if n == 0:
            return ReusePlan()
        bs = self.bm.block_size
        return ReusePlan(s.blocks[: -(-n // bs)], n, "session")

    def hand_over(self, session_id: str | None, request_id: str) -> None:
        """Turn `request_id`'s sequence has taken its own references: the session drops all of its."""
        s = self.sessions.get(session_id) if session_id is not None else None
        if s is not None and s.busy == request_id and s.blocks:
            self.bm.release(s.blocks)
            s.blocks = []
            s.token_ids = []

    def end_turn(self, session_id: str | None, request_id: str, seq: Sequence | None) -> None:
        """Turn `request_id` finished (seq) or was aborted (None): keep seq's computed tokens and blocks."""
        s = self.sessions.get(session_id) if session_id is not None else None
        if s is None or s.busy != request_id:
            return
        if s.blocks:
            self.bm.release(s.blocks)
        s.blocks, s.token_ids = [], []
        if seq is not None and seq.num_computed_tokens > 0:
            n = seq.num_computed_tokens
            blocks = seq.block_table[: -(-n // self.bm.block_size)]
            self.bm.acquire(blocks)
            s.blocks, s.token_ids = blocks, seq.token_ids[:n]
        s.busy = None
        self._touch(s)

    # ---- lifetime ------------------------------------------------------------------------------
    def end(self, session_id: str) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        if s.blocks:
            self.bm.release(s.blocks)
        return True

    def evict_one(self) -> bool:
        """Free the least recently used session's blocks (the session itself lives on)."""
        for s in self.sessions.values():
            if s.blocks:
                self.bm.release(s.blocks)
                s.blocks, s.token_ids = [], []
                self.evictions += 1
                return True
        return False

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        old = [s.session_id for s in self.sessions.values() if s.busy is None and now - s.last_used > self.ttl]
        for sid in old:
            self.end(sid)
        return len(old)

    def num_blocks_held(self) -> int:
        return sum(len(s.blocks) for s in self.sessions.values())

    def _touch(self, s: Session) -> None:
        s.last_used = time.monotonic()
        self.sessions.move_to_end(s.session_id)
