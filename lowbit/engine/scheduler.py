"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget (max_num_batched_tokens) shared by
  1. running sequences that add one token (decodes, cheapest, never starved by a long prompt),
  2. running sequences in the middle of a chunked prefill,
  3. waiting sequences, first come first served, each admitted with as big a prompt chunk as the
     remaining budget allows (the rest of a long prompt follows in later steps).
A sequence's step simply computes its next `min(uncomputed tokens, budget)` tokens, so prefill,
chunked prefill, decode and recompute-after-preemption are the same thing.

When the pool runs out of blocks: idle sessions' blocks are evicted first, then the most recently
admitted running sequence is preempted (its blocks freed; it is recomputed later from its tokens,
so it never produces a different token). No new sequences are admitted in a step that preempted.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, ReusePlan
from .sequence import Sequence, SequenceStatus
from .sessions import SessionManager


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed for seq this step, from seq.num_computed_tokens on
    samples: bool = field(init=False)  # the step reaches the end of seq's tokens: a new one is sampled

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # single-token items first
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    num_batched_tokens: int = 0
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        sessions: SessionManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.bm = block_manager
        self.sessions = sessions
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chosen: list[ScheduledSeq] = []
        picked: set[int] = set()
        preempted_before = self.num_preemptions

        for want_single in (True, False):
            for seq in list(self.running):
                if budget <= 0:
                    break
                if seq.seq_id in picked or seq.status is not SequenceStatus.RUNNING:
                    continue
                remaining = seq.num_tokens - seq.num_computed_tokens
                if remaining <= 0 or (remaining == 1) != want_single:
                    continue
                num_new = min(remaining, budget)
                if not self._make_room(self.bm.blocks_needed(seq, num_new), seq, picked):
                    self.preempt(seq)
                    continue
                self.bm.allocate_slots(seq, num_new)
                chosen.append(ScheduledSeq(seq, num_new))
                picked.add(seq.seq_id)
                budget -= num_new

        if self.num_preemptions == preempted_before:
            budget = self._admit(budget, chosen)

        singles = [s for s in chosen if s.num_new == 1]
        others = [s for s in chosen if s.num_new != 1]
        return SchedulerOutput(
            scheduled=singles + others,
            copies=self.bm.take_copies(),
            num_batched_tokens=self.max_num_batched_tokens - budget,
            num_preempted=self.num_preemptions - preempted_before,
        )

    def _admit(self, budget: int, chosen: list[ScheduledSeq]) -> int:
        slots = sum(1 if s.group.forked else s.group.n for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            need_slots = 1 if seq.group.forked else seq.group.n
            if slots + need_slots > self.max_num_seqs:
                break
            while True:
                plan = self._plan(seq)
                num_new = min(seq.num_tokens - plan.num_tokens, budget)
                need = self.bm.blocks_needed(seq, num_new, plan)
                if need <= self.bm.num_free_blocks or not self.sessions.evict_one():
                    break
            if need > self.bm.num_free_blocks:
                break  # FCFS: later requests wait behind this one
            self.waiting.popleft()
            self.bm.apply_plan(seq, plan)
            self.sessions.hand_over(seq.group.session_id, seq.group.request_id)
            self.bm.prefix_queries += seq.num_tokens
            self.bm.prefix_hits += plan.num_tokens
            if seq.group.first_scheduled_time is None:
                seq.group.first_scheduled_time = time.monotonic()
                seq.group.num_cached_tokens = plan.num_tokens
            self.bm.allocate_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen.append(ScheduledSeq(seq, num_new))
            slots += need_slots
            budget -= num_new
        return budget

    def _plan(self, seq: Sequence) -> ReusePlan:
        """The better of the session's cache and the prefix cache (without taking references)."""
        plan = self.sessions.plan(seq.group.session_id, seq.group.request_id, seq.token_ids)
        prefix = self.bm.lookup_prefix(seq)
        return prefix if prefix.num_tokens > plan.num_tokens else plan

    def _make_room(self, need: int, seq: Sequence, protected: set[int]) -> bool:
        """Free blocks until `need` are available: evict idle sessions, then preempt the lowest
        priority running sequences other than seq and those already scheduled this step."""
        while self.bm.num_free_blocks < need:
            if self.sessions.evict_one():
                continue
            victim = next(
                (s for s in reversed(self.running) if s is not seq and s.seq_id not in protected), None
            )
            if victim is None:
                return False
            self.preempt(victim)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it waits at the head of the queue to be recomputed from its tokens."""
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the step / removal --------------------------------------------------------------
    def step_done(self, out: SchedulerOutput) -> None:
        """The step's K/V are in the pool: advance computed counts and register full blocks."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new
            self.bm.register_computed(s.seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins the running set right away (its blocks are already shared)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of the queues and free its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
