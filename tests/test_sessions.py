"""Stateful sessions: a turn reuses the previous turns' KV and prefills only the new tokens; an
evicted, ended, expired or mismatching session falls back to prefilling more, never to wrong tokens."""
from __future__ import annotations

import time

import pytest

from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError

from test_engine import (  # noqa: F401  (fixtures)
    assert_pool_free, dense_greedy, engine_for, one_thread, prompts_of, tiny_dir, wide_dir,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def turn(engine, rid, prompt, session_id, params=GREEDY):
    """Run one request alone; return (final output, tokens computed in its first step)."""
    engine.add_request(rid, prompt, params, session_id=session_id)
    first_step_tokens, final = None, None
    orig = engine.scheduler.schedule

    def spy():
        out = orig()
        nonlocal first_step_tokens
        if first_step_tokens is None:
            first_step_tokens = out.num_batched_tokens
        return out

    engine.scheduler.schedule = spy
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    final = out
    finally:
        engine.scheduler.schedule = orig
    return final, first_step_tokens


def test_second_turn_prefills_only_new_tokens(tiny_dir):
    engine = engine_for(tiny_dir, enable_prefix_caching=False)  # reuse can only come from the session
    p1 = prompts_of([20], seed=21)[0]
    out1, _ = turn(engine, "t1", p1, "s")
    o1 = out1.outputs[0].token_ids
    assert out1.num_cached_tokens == 0
    held = engine.sessions.get("s")
    assert held.owner is None and held.token_ids == p1 + o1[:-1] and held.blocks
    p2 = p1 + o1 + prompts_of([7], seed=22)[0]
    out2, computed = turn(engine, "t2", p2, "s")
    assert out2.num_cached_tokens == len(p1) + len(o1) - 1
    assert computed == len(p2) - out2.num_cached_tokens == 8
    assert out2.outputs[0].token_ids == dense_greedy(engine.runner.model, p2, 12)
    # the same history sent fresh (no session) gives the same tokens, prefilling everything
    fresh, computed = turn(engine, "f", p2, None)
    assert fresh.outputs[0].token_ids == out2.outputs[0].token_ids
    assert fresh.num_cached_tokens == 0 and computed == len(p2)
    assert engine.end_session("s") is True and engine.end_session("s") is False
    assert_pool_free(engine)


def test_mismatching_prompt_reuses_the_common_prefix_only(tiny_dir):
    engine = engine_for(tiny_dir, enable_prefix_caching=False)
    p1 = prompts_of([25], seed=23)[0]
    turn(engine, "t1", p1, "s")
    p2 = p1[:10] + prompts_of([9], seed=24)[0]  # diverges inside a block (block_size 8)
    out2, computed = turn(engine, "t2", p2, "s")
    assert out2.num_cached_tokens == 10 and computed == len(p2) - 10
    assert out2.outputs[0].token_ids == dense_greedy(engine.runner.model, p2, 12)
    # the session now holds turn 2; a third turn that continues it reuses all of it
    p3 = p2 + out2.outputs[0].token_ids + [5, 6]
    out3, _ = turn(engine, "t3", p3, "s")
    assert out3.num_cached_tokens == len(p2) + 11
    assert out3.outputs[0].token_ids == dense_greedy(engine.runner.model, p3, 12)
    engine.end_session("s")
    assert_pool_free(engine)


def test_evicted_session_falls_back_to_full_prefill(wide_dir):
    engine = engine_for(wide_dir, enable_prefix_caching=False, max_num_batched_tokens=64)
    p1 = prompts_of([50], seed=25)[0]
    out1, _ = turn(engine, "t1", p1, "s")
    assert engine.sessions.get("s").blocks
    # other traffic needs the whole pool: the idle session's blocks are evicted (LRU)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(prompts_of([60, 60, 60], seed=26)):
        engine.add_request(f"x{i}", p, params)
    while engine.has_unfinished():
        engine.step()
    assert engine.sessions.evictions >= 1 and not engine.sessions.get("s").blocks
    p2 = p1 + out1.outputs[0].token_ids + [1, 2, 3]
    out2, computed = turn(engine, "t2", p2, "s")
    assert out2.num_cached_tokens == 0 and computed == min(len(p2), 64)
    assert out2.outputs[0].token_ids == dense_greedy(engine.runner.model, p2, 12)
    engine.end_session("s")
    assert_pool_free(engine)


def test_evicted_session_can_still_hit_the_prefix_cache(wide_dir):
    engine = engine_for(wide_dir, enable_prefix_caching=True)
    p1 = prompts_of([40], seed=27)[0]
    out1, _ = turn(engine, "t1", p1, "s")
    assert engine.sessions.evict_one()
    p2 = p1 + out1.outputs[0].token_ids + [9]
    out2, _ = turn(engine, "t2", p2, "s")
    assert out2.num_cached_tokens > 0 and out2.num_cached_tokens % 8 == 0  # whole cached blocks
    assert out2.outputs[0].token_ids == dense_greedy(engine.runner.model, p2, 12)
    engine.end_session("s")
    assert_pool_free(engine)


def test_abort_busy_expiry_and_max_sessions(tiny_dir):
    engine = engine_for(tiny_dir, max_sessions=2, enable_prefix_caching=False)
    p = prompts_of([12], seed=28)[0]
    engine.add_request("a", p, GREEDY, session_id="s1")
    with pytest.raises(LowbitError, match="busy"):
        engine.add_request("b", p, GREEDY, session_id="s1")
    engine.step()
    engine.abort_request("a")  # an aborted turn leaves the session empty but usable
    s1 = engine.sessions.get("s1")
    assert s1.owner is None and not s1.blocks
    out, _ = turn(engine, "c", p, "s1")
    assert out.num_cached_tokens == 0 and engine.sessions.get("s1").blocks
    turn(engine, "d", p, "s2")
    # a third session evicts the least recently used idle one (s1) entirely
    turn(engine, "e", p, "s3")
    assert "s1" not in engine.sessions and "s2" in engine.sessions and len(engine.sessions) == 2
    # all busy -> refused
    engine.add_request("f", p, GREEDY, session_id="s2")
    engine.add_request("g", p, GREEDY, session_id="s3")
    with pytest.raises(LowbitError, match="too many active sessions"):
        engine.add_request("h", p, GREEDY, session_id="s4")
    engine.abort_request(["f", "g"])
    # idle sessions expire after session_ttl
    assert engine.sessions.expire(now=time.monotonic() + engine.args.session_ttl + 1) == 2
    assert len(engine.sessions) == 0
    assert_pool_free(engine)


def test_diverging_turn_never_writes_into_a_prefix_cached_block(tiny_dir):
    """Turn 2 diverges inside a FULL block that the prefix cache knows: it must copy, not overwrite."""
    engine = engine_for(tiny_dir, enable_prefix_caching=True)
    p1 = prompts_of([30], seed=29)[0]
    turn(engine, "t1", p1, "s")
    p2 = p1[:12] + prompts_of([10], seed=30)[0]  # diverges in block 1 (tokens 8..15)
    out2, _ = turn(engine, "t2", p2, "s")
    assert out2.num_cached_tokens == 12
    assert out2.outputs[0].token_ids == dense_greedy(engine.runner.model, p2, 12)
    # a fresh request for the first prompt hits the cached blocks 0..2, which must be intact
    p3 = p1 + [7, 7]
    out3, _ = turn(engine, "t3", p3, None)
    assert out3.num_cached_tokens >= 24
    assert out3.outputs[0].token_ids == dense_greedy(engine.runner.model, p3, 12)
    engine.end_session("s")
    assert_pool_free(engine)
