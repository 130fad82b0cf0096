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

from dataclasses import dataclass, field

from .block_manager import BlockManager, ReusePlan
from .sequence import Sequence
from .session_store import SessionEntry, SessionStore


@dataclass
class Session(SessionEntry):
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V the blocks hold
    blocks: list[int] = field(default_factory=list)  # references held while idle


class SessionManager:
    """The engine's sessions (a SessionStore: TTL, LRU, max_sessions) and the KV blocks they hold."""

    def __init__(self, block_manager: BlockManager, ttl: float, max_sessions: int) -> None:
        self.bm = block_manager
        self.store: SessionStore[Session] = SessionStore(ttl, max_sessions, Session, on_drop=self._free)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.store

    def get(self, session_id: str) -> Session | None:
        return self.store.get(session_id)

    # ---- turns ---------------------------------------------------------------------------------
    def begin_turn(self, session_id: str, request_id: str) -> Session:
        """Mark the session busy with a new turn (creating it, within max_sessions)."""
        return self.store.acquire(session_id, request_id)

    def plan(self, session_id: str | None, request_id: str, token_ids: list[int]) -> ReusePlan:
        """Reusable K/V for turn `request_id`: the longest common prefix of its tokens with the
        session's, keeping at least one token to compute."""
        s = self.store.get(session_id)
        if s is None or not s.blocks or s.owner != request_id:
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
        s = self.store.get(session_id)
        if s is not None and s.owner == request_id and s.blocks:
            self._free(s)

    def end_turn(self, session_id: str | None, request_id: str, seq: Sequence | None) -> None:
        """Turn `request_id` finished (seq) or was aborted (None): keep seq's computed tokens and blocks."""
        s = self.store.get(session_id)
        if s is None or s.owner != request_id:
            return
        self._free(s)
        if seq is not None and seq.num_computed_tokens > 0:
            n = seq.num_computed_tokens
            blocks = seq.block_table[: -(-n // self.bm.block_size)]
            self.bm.acquire(blocks)
            s.blocks, s.token_ids = blocks, seq.token_ids[:n]
        self.store.release(session_id, request_id)

    # ---- lifetime ------------------------------------------------------------------------------
    def end(self, session_id: str) -> bool:
        s = self.store.remove(session_id)
        if s is None:
            return False
        self._free(s)
        return True

    def evict_one(self) -> bool:
        """Free the least recently used session's blocks (the session itself lives on)."""
        for s in self.store.values():
            if s.blocks:
                self._free(s)
                self.evictions += 1
                return True
        return False

    def expire(self, now: float | None = None) -> int:
        return self.store.expire(now)

    def num_blocks_held(self) -> int:
        return sum(len(s.blocks) for s in self.store.values())

    def _free(self, s: Session) -> None:
        """Give back the session's block references (it keeps no tokens without them)."""
        if s.blocks:
            self.bm.release(s.blocks)
        s.blocks, s.token_ids = [], []
