"""Continuous batching without a model: budgets, chunked prefill, FCFS, preemption, abort."""
from __future__ import annotations

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.scheduler import Scheduler, SchedulerOutput
from lowbit.engine.sequence import SequenceGroup, SequenceStatus
from lowbit.engine.sessions import SessionManager

BS = 4
_ids = iter(range(1, 10**6))


def make(num_blocks=64, max_seqs=8, budget=32, caching=True):
    bm = BlockManager(num_blocks, BS, caching)
    return Scheduler(bm, SessionManager(bm, ttl=60, max_sessions=4), max_seqs, budget), bm


def add(sched: Scheduler, prompt_len: int, start: int = 0, n: int = 1):
    g = SequenceGroup(f"r{next(_ids)}", None, list(range(start, start + prompt_len)), SamplingParams(n=n), next(_ids))
    sched.add(g.seqs[0])
    return g.seqs[0]


def run_step(sched: Scheduler) -> SchedulerOutput:
    """Schedule, pretend the model ran, append a fake token to every sequence that sampled."""
    out = sched.schedule()
    samplers = [s.seq for s in out.scheduled if s.samples]
    sched.step_done(out)
    for seq in samplers:
        seq.token_ids.append(7)
        seq.output_token_ids.append(7)
    return out


def finish(sched: Scheduler, seq) -> None:
    seq.status = SequenceStatus.FINISHED
    sched.remove(seq)


def test_budget_chunked_prefill_and_decodes_first():
    sched, bm = make(budget=16)
    a = add(sched, 5)
    out = run_step(sched)
    assert [(s.seq, s.num_new) for s in out.scheduled] == [(a, 5)]
    b = add(sched, 40, start=100)  # long prompt: chunks of what the budget leaves
    out = run_step(sched)
    assert [(s.seq, s.num_new) for s in out.scheduled] == [(a, 1), (b, 15)]
    assert not out.scheduled[1].samples and out.num_batched_tokens == 16
    out = run_step(sched)
    assert [(s.seq, s.num_new) for s in out.scheduled] == [(a, 1), (b, 15)]
    out = run_step(sched)
    assert [(s.seq, s.num_new) for s in out.scheduled] == [(a, 1), (b, 10)]
    assert out.scheduled[1].samples  # prompt done: b samples its first token
    out = run_step(sched)
    assert [(s.seq, s.num_new) for s in out.scheduled] == [(a, 1), (b, 1)]
    for s in (a, b):
        finish(sched, s)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_single_token_items_come_first():
    sched, bm = make(budget=64)
    a = add(sched, 6)
    run_step(sched)  # a now decodes
    b = add(sched, 9, start=50)
    out = run_step(sched)
    assert [s.num_new for s in out.scheduled] == [1, 9]
    assert out.scheduled[0].seq is a
    for s in (a, b):
        finish(sched, s)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_max_num_seqs_and_fcfs():
    sched, bm = make(max_seqs=2, budget=64)
    seqs = [add(sched, 3, start=10 * i) for i in range(4)]
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    finish(sched, seqs[0])
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [seqs[1], seqs[2]]
    for s in seqs[1:3]:
        finish(sched, s)
    sched.remove(seqs[3])
    assert bm.num_free_blocks == bm.num_total_blocks


def test_n_samples_reserve_their_slots():
    sched, bm = make(max_seqs=3, budget=64)
    a = add(sched, 3, n=3)
    b = add(sched, 3, start=20)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [a]  # a will fork into 3: no room for b
    finish(sched, a)
    sched.remove(b)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_preemption_frees_latest_and_recomputes():
    sched, bm = make(num_blocks=6, budget=64, caching=False)
    a, b, c = (add(sched, 6, start=100 * i) for i in range(3))
    out = run_step(sched)  # all three prefill: 2 blocks each, pool full
    assert len(out.scheduled) == 3 and bm.num_free_blocks == 0
    for _ in range(10):  # decode until someone needs a third block
        out = run_step(sched)
        if out.num_preempted:
            break
    assert out.num_preempted == 1 and sched.num_preemptions == 1
    # the latest admitted (c) made room for a and b
    assert c.status is SequenceStatus.PREEMPTED and c.num_computed_tokens == 0 and c.block_table == []
    assert [s.seq for s in out.scheduled] == [a, b] and sched.waiting[0] is c
    finish(sched, a)
    finish(sched, b)
    n_tokens = c.num_tokens
    assert n_tokens > 6
    out = run_step(sched)
    # c comes back with its whole token list (prompt + its sampled tokens) to recompute
    assert [(s.seq, s.num_new) for s in out.scheduled] == [(c, n_tokens)]
    assert out.scheduled[0].samples
    finish(sched, c)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_a_sequence_that_cannot_fit_preempts_itself_not_the_scheduled():
    sched, bm = make(num_blocks=3, budget=64, caching=False)
    a = add(sched, 4)
    b = add(sched, 4, start=40)
    run_step(sched)  # a: 1 block + token -> b: 1 block
    run_step(sched)  # both need a second block: 1 free -> a gets it, b preempts itself
    assert sched.running == [a] and b.status is SequenceStatus.PREEMPTED
    finish(sched, a)
    sched.remove(b)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_prefix_cache_hit_at_admission():
    sched, bm = make(budget=64)
    a = add(sched, 12)
    run_step(sched)
    finish(sched, a)
    b = add(sched, 14)  # same first 12 tokens
    out = run_step(sched)
    assert out.scheduled[0].seq is b and out.scheduled[0].num_new == 2
    assert b.group.num_cached_tokens == 12
    assert bm.prefix_hits == 12 and bm.prefix_queries == 12 + 14
    finish(sched, b)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_remove_frees_waiting_and_running():
    sched, bm = make(budget=8)
    a = add(sched, 20)  # chunked: running mid-prefill
    run_step(sched)
    b = add(sched, 4, start=30)
    assert bm.num_free_blocks < bm.num_total_blocks
    sched.remove(a)
    sched.remove(b)
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_total_blocks
