"""Block allocator: ref counts, prefix caching (hash chains, LRU eviction), copy-on-write."""
from __future__ import annotations

import pytest

from lowbit.engine.block_manager import BlockManager, ReusePlan
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.sequence import SequenceGroup

BS = 4
_ids = iter(range(1, 10**6))


def make_seq(tokens: list[int], n: int = 1):
    g = SequenceGroup(f"r{next(_ids)}", None, list(tokens), SamplingParams(n=n), next(_ids))
    return g.seqs[0]


def compute(bm: BlockManager, seq, num_new: int | None = None) -> None:
    """What the scheduler + a step do: allocate, 'write', advance, register."""
    num_new = seq.num_tokens - seq.num_computed_tokens if num_new is None else num_new
    assert bm.blocks_needed(seq, num_new) <= bm.num_free_blocks
    bm.allocate_slots(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.register_computed(seq)


def test_allocate_release_and_refcounts():
    bm = BlockManager(8, BS)
    a = bm.allocate(3)
    assert len(set(a)) == 3 and bm.num_free_blocks == 5
    assert bm.usage() == pytest.approx(3 / 8)
    bm.acquire(a[:1])
    bm.release(a)
    assert bm.num_free_blocks == 7  # a[0] still referenced once
    bm.release(a[:1])
    assert bm.num_free_blocks == 8 and bm.usage() == 0.0
    with pytest.raises(RuntimeError):
        bm.release(a[:1])


def test_sequence_blocks_cover_tokens_and_free_returns_all():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3
    compute(bm, seq, 6)
    assert len(seq.block_table) == 2
    compute(bm, seq)  # the remaining 4 tokens
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 10
    bm.free_seq(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_prefix_cache_hit_reuses_blocks_and_leaves_one_token():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(12)))  # 3 full blocks
    compute(bm, a)
    assert bm.num_cached_blocks() == 3
    bm.free_seq(a)
    b = make_seq(list(range(10)) + [99, 98, 97])
    plan = bm.lookup_prefix(b)
    assert plan.source == "prefix" and plan.num_tokens == 8  # block 3 differs (tokens 8..11 vs 8,9,99,98)
    assert plan.blocks == a_blocks_prefix(bm, list(range(12)), 2)
    c = make_seq(list(range(12)))  # identical prompt: all but the last block (a token must be computed)
    assert bm.lookup_prefix(c).num_tokens == 8
    d = make_seq(list(range(13)))
    assert bm.lookup_prefix(d).num_tokens == 12


def a_blocks_prefix(bm: BlockManager, tokens: list[int], n: int) -> list[int]:
    probe = make_seq(tokens + [0])
    bm.update_hashes(probe)
    return [bm.cached[h] for h in probe.block_hashes[:n]]


def test_hash_chain_depends_on_whole_prefix():
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a)
    b = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # same second block, different first block
    assert bm.lookup_prefix(b).num_tokens == 0


def test_reviving_cached_free_blocks_and_counting_them():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(9)))
    compute(bm, a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 6  # cached blocks are free (evictable)
    b = make_seq(list(range(8)) + [50, 51, 52])
    plan = bm.lookup_prefix(b)
    assert plan.num_tokens == 8
    # the 2 reused blocks leave the free list, plus 1 new block for tokens 8..10
    assert bm.blocks_needed(b, 3, plan) == 3
    bm.apply_plan(b, plan)
    assert b.num_computed_tokens == 8 and bm.num_free_blocks == 4
    compute(bm, b)
    assert b.block_table[:2] == plan.blocks
    bm.free_seq(b)
    assert bm.num_free_blocks == 6


def test_lru_eviction_drops_hash_entries():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(8)) + [0])
    compute(bm, a)  # blocks: 2 full (cached) + 1 partial
    bm.free_seq(a)
    hog = make_seq(list(range(100, 113)))  # needs 4 blocks: evicts everything
    compute(bm, hog)
    assert bm.num_cached_blocks() == 3  # the hog's own three full blocks
    assert bm.lookup_prefix(make_seq(list(range(9)))).num_tokens == 0
    bm.free_seq(hog)
    assert bm.num_free_blocks == 4


def test_partial_blocks_are_evicted_before_cached_ones():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(6)))  # 1 full (cached) + 1 partial
    compute(bm, a)
    bm.free_seq(a)
    b = make_seq([77, 78])  # takes one block: must not be the cached one
    compute(bm, b)
    assert bm.lookup_prefix(make_seq(list(range(6)))).num_tokens == 4
    bm.free_seq(b)


def test_fork_shares_blocks_and_copy_on_write():
    bm = BlockManager(8, BS)
    parent = make_seq(list(range(6)), n=2)  # 1 full + 1 partial block
    compute(bm, parent)
    child = parent.fork(999, 1, None)
    bm.fork(parent, child)
    shared = parent.block_table[1]
    assert bm.ref[shared] == 2 and bm.num_free_blocks == 6
    for s, tok in ((parent, 7), (child, 8)):
        s.token_ids.append(tok)
    assert bm.blocks_needed(child, 1) == 1  # the private copy
    compute(bm, child, 1)
    assert child.block_table[1] != shared and child.block_table[0] == parent.block_table[0]
    assert bm.take_copies() == [(shared, child.block_table[1])]
    assert bm.ref[shared] == 1
    assert bm.blocks_needed(parent, 1) == 0  # sole owner now: writes in place
    compute(bm, parent, 1)
    assert parent.block_table[1] == shared and bm.take_copies() == []
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free_blocks == 8


def test_session_plan_counts_cow_of_partial_block():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(6)))
    blocks = bm.allocate(2)
    # a session holding both blocks: taking them over needs no copy (the session lets go) ...
    assert bm.blocks_needed(seq, 1, ReusePlan(blocks, 5, "session")) == 0
    # ... unless someone else also holds the partial block
    bm.acquire(blocks[1:])
    assert bm.blocks_needed(seq, 1, ReusePlan(blocks, 5, "session")) == 1
    bm.release(blocks[1:])
    bm.release(blocks)
    assert bm.num_free_blocks == 8


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    compute(bm, a)
    bm.free_seq(a)
    assert bm.num_cached_blocks() == 0
    assert bm.lookup_prefix(make_seq(list(range(9)))).num_tokens == 0


def test_writing_into_a_prefix_cached_block_copies_it():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(9)))
    compute(bm, a)  # blocks 0, 1 full and registered
    reused = a.block_table[:2]
    bm.acquire(reused)  # what a session does at the end of a turn
    bm.free_seq(a)
    b = make_seq(list(range(6)) + [40, 41, 42])  # diverges at token 6, inside cached block 1
    plan = ReusePlan(reused, 6, "session")
    assert bm.blocks_needed(b, 3, plan) == 2  # a copy of block 1 (tokens 6, 7) + a new block (token 8)
    bm.apply_plan(b, plan)
    bm.release(reused)  # the session hands over
    compute(bm, b)
    assert b.block_table[0] == reused[0] and b.block_table[1] != reused[1]
    assert bm.take_copies() == [(reused[1], b.block_table[1])]
    assert bm.lookup_prefix(make_seq(list(range(9)))).blocks == reused  # cached block left intact
    bm.free_seq(b)
    assert bm.num_free_blocks == 8


def test_reset_prefix_cache_drops_only_unreferenced_blocks():
    bm = BlockManager(16, BS)
    a, b = make_seq(list(range(12))), make_seq(list(range(100, 112)))
    compute(bm, a)
    compute(bm, b)
    bm.free_seq(a)  # a's 3 blocks are cached and free; b's are cached and in use
    assert bm.num_cached_blocks() == 6
    assert bm.reset_prefix_cache() == 3
    assert bm.lookup_prefix(make_seq(list(range(13)))).num_tokens == 0
    assert bm.lookup_prefix(make_seq(list(range(100, 113)))).num_tokens == 12
    assert bm.num_free_blocks == 13 and bm.num_cached_blocks() == 3
