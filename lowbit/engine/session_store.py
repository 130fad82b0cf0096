"""A store of sessions bounded in count (least recently used idle session goes first) and idle time.

Both kinds of session use it: the engine's (a conversation's KV blocks between turns) and the
server's (a chat conversation's messages). A session is busy while one turn owns it: a busy session
is never dropped, and a second turn on it is refused. Idle sessions expire `ttl` seconds after
their last use; creating one past `max_sessions` drops the least recently used idle one, or is
refused when every session is busy.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import LowbitError


class SessionLimitError(LowbitError):
    """max_sessions are live and every one is busy."""


class SessionBusyError(LowbitError):
    """Another turn owns the session."""


@dataclass
class SessionEntry:
    """What the store tracks of every session; kinds of session extend it with their state."""

    session_id: str
    last_used: float = field(default_factory=time.monotonic)
    owner: str | None = None  # request id of the turn in flight, None when idle


S = TypeVar("S", bound=SessionEntry)


class SessionStore(Generic[S]):
    """session id -> session, least recently used first.

    make(session_id) builds a new session; on_drop(session) runs for every session the store drops
    by itself (expired, or the least recently used one evicted to make room), after removing it.
    """

    def __init__(self, ttl: float, max_sessions: int, make: Callable[[str], S],
                 on_drop: Callable[[S], None] | None = None) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._make = make
        self._on_drop = on_drop
        self._sessions: OrderedDict[str, S] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str | None) -> S | None:
        return self._sessions.get(session_id) if session_id is not None else None

    def values(self) -> Iterator[S]:
        """The sessions, least recently used first."""
        return iter(list(self._sessions.values()))

    def acquire(self, session_id: str, owner: str) -> S:
        """The session (created on first use, within max_sessions) marked busy with turn `owner`."""
        s = self._sessions.get(session_id)
        if s is None:
            if len(self._sessions) >= self.max_sessions:
                idle = next((x for x in self._sessions.values() if x.owner is None), None)
                if idle is None:
                    raise SessionLimitError(f"too many active sessions (max_sessions={self.max_sessions})")
                self._drop(idle.session_id)
            s = self._sessions[session_id] = self._make(session_id)
        elif s.owner is not None:
            raise SessionBusyError(f"session {session_id!r} is busy with request {s.owner!r}; wait for it to finish")
        s.owner = owner
        self._touch(s)
        return s

    def release(self, session_id: str | None, owner: str) -> bool:
        """Turn `owner` is done with the session; False (nothing changed) for any other turn."""
        s = self.get(session_id)
        if s is None or s.owner != owner:
            return False
        s.owner = None
        self._touch(s)
        return True

    def remove(self, session_id: str) -> S | None:
        """Forget the session (busy or not); the caller frees what it holds."""
        return self._sessions.pop(session_id, None)

    def expire(self, now: float | None = None) -> int:
        """Drop the idle sessions unused for more than ttl seconds; returns how many."""
        now = time.monotonic() if now is None else now
        old = [s.session_id for s in self._sessions.values() if s.owner is None and now - s.last_used > self.ttl]
        for sid in old:
            self._drop(sid)
        return len(old)

    def _drop(self, session_id: str) -> None:
        s = self._sessions.pop(session_id)
        if self._on_drop is not None:
            self._on_drop(s)

    def _touch(self, s: S) -> None:
        s.last_used = time.monotonic()
        self._sessions.move_to_end(s.session_id)
