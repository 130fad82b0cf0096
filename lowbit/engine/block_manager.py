"""Paged KV block allocator: free list, reference counts, automatic prefix caching, copy-on-write.

* Every block has a reference count; sequences (and idle sessions) hold references. A block whose
  count drops to 0 goes back to the free list but KEEPS its contents and prefix-cache hash, so a
  later request with the same prefix can pick it up again until it is evicted (LRU: the free list
  is popped from the front; blocks with no hash go to the front, they are worthless to keep).
* Prefix caching: a FULL block is identified by hash(parent block's hash, its token ids), a chain,
  so equal hashes mean equal whole prefixes (blake2b, collision-resistant, not Python's hash()).
  Only blocks whose K/V have been computed are registered, and registered blocks are never written.
* Copy-on-write: a sequence about to write into a block it shares (forked n > 1 samples, a block
  reused from a session) or one registered in the prefix cache (a session turn diverging inside a
  cached block) first gets a private copy; the (src, dst) pair is queued in `pending_copies` for
  the model runner to apply to the pool before the step.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import LowbitError
from .sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class ReusePlan:
    """KV blocks a new sequence can start from instead of prefilling their tokens."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0
    source: str = "none"  # none | prefix | session


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise LowbitError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that prefix block
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0  # tokens looked up (counted by the scheduler at admission)
        self.prefix_hits = 0  # tokens served from cached blocks

    # ---- accounting ------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references (cached-but-unreferenced blocks count: they are evictable)."""
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_total_blocks

    def num_cached_blocks(self) -> int:
        return len(self.cached)

    # ---- low level ---------------------------------------------------------------------------
    def _forget_hash(self, b: int) -> bool:
        """Drop block b's prefix-cache entry, if it has one."""
        h = self.hash_of[b]
        if h is None:
            return False
        if self.cached.get(h) == b:
            del self.cached[h]
        self.hash_of[b] = None
        return True

    def _pop_free(self) -> int:
        b, _ = self.free.popitem(last=False)
        self._forget_hash(b)  # evict its prefix-cache entry: the block is about to be overwritten
        self.ref[b] = 1
        return b

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise LowbitError(f"KV pool exhausted: need {n} blocks, {len(self.free)} free")
        return [self._pop_free() for _ in range(n)]

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on each block (reviving cached free blocks)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop a reference on each block; the last block is released first so that, among equally
        old blocks, a sequence's tail is evicted before its (more shareable) head."""
        for b in reversed(blocks):
            r = self.ref[b] - 1
            if r < 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            self.ref[b] = r
            if r == 0:
                self.free[b] = None
                if self.hash_of[b] is None:
                    self.free.move_to_end(b, last=False)

    # ---- prefix caching ----------------------------------------------------------------------
    def reset_prefix_cache(self) -> int:
        """Forget every cached block nobody references (benchmarks repeating a workload, tests);
        blocks in use keep their entries. Returns how many entries were dropped."""
        return sum(self._forget_hash(b) for b in self.free)

    def update_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes over every full block of its known tokens."""
        bs, hashes, ids = self.block_size, seq.block_hashes, seq.token_ids
        for i in range(len(hashes), len(ids) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else b"", ids[i * bs : (i + 1) * bs]))

    def lookup_prefix(self, seq: Sequence) -> ReusePlan:
        """Longest chain of cached full blocks matching seq's tokens. At least one token is left to
        compute (its logits are needed), so a fully cached prompt reuses all but its last block."""
        if not self.enable_prefix_caching:
            return ReusePlan()
        self.update_hashes(seq)
        limit = (seq.num_tokens - 1) // self.block_size
        blocks = []
        for h in seq.block_hashes[:limit]:
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return ReusePlan(blocks, len(blocks) * self.block_size, "prefix" if blocks else "none")

    def register_computed(self, seq: Sequence) -> None:
        """Offer seq's newly completed full blocks to the prefix cache (after their K/V are written)."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.block_size
        if n_full <= seq.num_registered_blocks:
            return
        self.update_hashes(seq)
        for i in range(seq.num_registered_blocks, n_full):
            b, h = seq.block_table[i], seq.block_hashes[i]
            if self.hash_of[b] is None and h not in self.cached:
                self.cached[h] = b
                self.hash_of[b] = h
        seq.num_registered_blocks = n_full

    # ---- per sequence ------------------------------------------------------------------------
    def _must_copy(self, block: int, own_refs: int) -> bool:
        """A block about to be written needs a private copy if someone else holds it, or if the
        prefix cache knows it (a reused block whose tail is overwritten after a divergence)."""
        return self.ref[block] > own_refs or self.hash_of[block] is not None

    def _needs_cow(self, seq: Sequence) -> bool:
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and self._must_copy(seq.block_table[i], 1)

    def blocks_needed(self, seq: Sequence, num_new: int, plan: ReusePlan | None = None) -> int:
        """Free blocks that scheduling `num_new` more tokens of seq would consume (plan: a reuse
        plan not yet applied to a waiting sequence)."""
        bs = self.block_size
        if plan is not None and plan.blocks:
            total = plan.num_tokens + num_new
            revive = sum(1 for b in plan.blocks if self.ref[b] == 0)
            i = plan.num_tokens // bs
            cow = i < len(plan.blocks) and self._must_copy(plan.blocks[i], 1 if plan.source == "session" else 0)
            return revive + max(0, -(-total // bs) - len(plan.blocks)) + int(cow)
        total = seq.num_computed_tokens + num_new
        return max(0, -(-total // bs) - len(seq.block_table)) + int(self._needs_cow(seq))

    def apply_plan(self, seq: Sequence, plan: ReusePlan) -> None:
        """Start a waiting sequence from reused blocks (takes its own references)."""
        if not plan.blocks:
            return
        self.acquire(plan.blocks)
        seq.block_table = list(plan.blocks)
        seq.num_computed_tokens = plan.num_tokens
        seq.num_registered_blocks = plan.num_tokens // self.block_size if plan.source == "prefix" else 0

    def allocate_slots(self, seq: Sequence, num_new: int) -> None:
        """Make seq's block table cover num_computed + num_new tokens, copying a shared block first.
        The caller has checked `blocks_needed` against `num_free_blocks`."""
        if self._needs_cow(seq):
            i = seq.num_computed_tokens // self.block_size
            old = seq.block_table[i]
            new = self.allocate(1)[0]
            self.release([old])
            seq.block_table[i] = new
            self.pending_copies.append((old, new))
        need = -(-(seq.num_computed_tokens + num_new) // self.block_size) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(self.allocate(need))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child.block_table is a copy of parent's: take the child's references."""
        self.acquire(child.block_table)

    def free_seq(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []

    def take_copies(self) -> list[tuple[int, int]]:
        out, self.pending_copies = self.pending_copies, []
        return out
