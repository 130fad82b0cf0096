"""SessionStore: the one TTL + LRU session store behind the engine's and the server's sessions."""
from __future__ import annotations

import time

import pytest

from lowbit.engine.session_store import SessionBusyError, SessionEntry, SessionLimitError, SessionStore


def _store(ttl=60.0, max_sessions=2):
    dropped = []
    return SessionStore(ttl, max_sessions, SessionEntry, on_drop=lambda s: dropped.append(s.session_id)), dropped


def test_busy_sessions_are_refused_and_never_dropped():
    store, dropped = _store()
    store.acquire("a", "r1")
    with pytest.raises(SessionBusyError, match="'a' is busy with request 'r1'"):
        store.acquire("a", "r2")
    store.acquire("b", "r3")
    with pytest.raises(SessionLimitError, match="max_sessions=2"):
        store.acquire("c", "r4")  # both busy: no room
    assert store.expire(now=time.monotonic() + 1e6) == 0 and dropped == []
    assert not store.release("a", "r2") and store.get("a").owner == "r1"  # only the owning turn releases
    assert store.release("a", "r1") and store.get("a").owner is None


def test_the_least_recently_used_idle_session_makes_room():
    store, dropped = _store()
    for sid in ("a", "b"):
        store.acquire(sid, f"t-{sid}")
        store.release(sid, f"t-{sid}")
    store.acquire("a", "t2")  # a is now the most recently used
    store.release("a", "t2")
    store.acquire("c", "t3")
    assert dropped == ["b"] and "b" not in store and [s.session_id for s in store.values()] == ["a", "c"]


def test_idle_sessions_expire_after_ttl_and_remove_does_not_count_as_a_drop():
    store, dropped = _store(ttl=10.0, max_sessions=4)
    store.acquire("idle", "t1")
    store.release("idle", "t1")
    store.acquire("busy", "t2")
    store.acquire("gone", "t3")
    assert store.remove("gone").session_id == "gone" and store.remove("gone") is None
    assert store.expire(now=time.monotonic() + 5) == 0
    assert store.expire(now=time.monotonic() + 11) == 1
    assert dropped == ["idle"] and list(s.session_id for s in store.values()) == ["busy"]


def test_chat_sessions_answer_404_429_409_from_the_store():
    from lowbit.serve.chat import ChatSessions
    from lowbit.serve.errors import APIError

    class Engine:
        ended: list[str] = []

        def end_session(self, sid):
            self.ended.append(sid)
            return True

    chats = ChatSessions(Engine(), ttl=10.0, max_sessions=1)
    s = chats.acquire("x", "r1")
    with pytest.raises(APIError) as busy:
        chats.acquire("x", "r2")
    assert busy.value.status == 409
    with pytest.raises(APIError) as full:
        chats.acquire("y", "r3")
    assert full.value.status == 429
    chats.release(s, "r1")
    s.last_used -= 11  # idle past the ttl: dropped at the next acquire, and ended in the engine
    chats.acquire("y", "r4")
    assert Engine.ended == ["x"] and len(chats) == 1
    with pytest.raises(APIError) as expired:
        chats.acquire("x", "r5")
    assert expired.value.status == 404
