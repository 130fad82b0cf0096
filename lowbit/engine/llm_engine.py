"""LLMEngine: requests in, cumulative RequestOutputs out, one `step()` at a time (vLLM style).

The engine is single-threaded: LLM drives it in a loop, AsyncEngine from one background thread.
Each step schedules a mixed batch (decodes + prefill chunks), runs it over the paged KV pool,
appends the sampled tokens, and returns the outputs of the requests that changed.
"""
from __future__ import annotations

import logging
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import LowbitError
from ..models.config import ModelConfig
from ..models.loader import LoadedModel
from .args import EngineArgs
from .block_manager import BlockManager
from .model_runner import ModelRunner, SampledToken
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, SequenceGroup, SequenceStatus
from .sessions import SessionManager

log = logging.getLogger("lowbit.engine")


@dataclass
class EngineStats:
    num_running: int  # requests with a sequence in the running batch
    num_waiting: int  # requests queued (or preempted) with nothing running
    kv_usage: float  # fraction of KV blocks referenced, 0..1
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up at admission
    prefix_cache_hits: int  # of those, tokens served from the prefix cache or a session
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    num_sessions: int
    kv_cache_dtype: str
    kv_capacity_tokens: int


class LLMEngine:
    def __init__(
        self,
        args: EngineArgs | None = None,
        *,
        loaded: LoadedModel | None = None,
        sampler: Callable | None = None,
    ) -> None:
        self.args = args = args if args is not None else EngineArgs()
        self.generator = torch.Generator()  # what unseeded requests draw from; torch's global RNG is left alone
        with torch.random.fork_rng(devices=[]):
            # Seeded where torch.manual_seed(seed) followed by loading the model leaves the global
            # RNG (loading draws from it: fusing fp projections initialises new nn.Linears): that is
            # the stream unseeded requests drew from when the engine reseeded the global RNG, so an
            # engine seed gives the same tokens as before. fork_rng puts the caller's state back.
            torch.manual_seed(args.seed)
            self.runner = ModelRunner(args, loaded, sampler, self.generator)
            self.generator.set_state(torch.get_rng_state())
        self.tokenizer: Any = self.runner.tokenizer
        self.model_config: ModelConfig = self.runner.config
        self.eos_token_ids = frozenset(self.runner.eos_token_ids)
        pool = self.runner.pool
        self.max_model_len = self._resolve_max_model_len(args, pool.num_blocks, pool.block_size)
        self.block_manager = BlockManager(pool.num_blocks, pool.block_size, args.enable_prefix_caching)
        self.sessions = SessionManager(self.block_manager, args.session_ttl, args.max_sessions)
        self.scheduler = Scheduler(self.block_manager, self.sessions, args.max_num_seqs, args.max_num_batched_tokens)
        self.groups: dict[str, SequenceGroup] = {}
        self._next_seq_id = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_expiry = time.monotonic()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def _resolve_max_model_len(self, args: EngineArgs, num_blocks: int, block_size: int) -> int:
        model_max = self.model_config.max_position_embeddings
        capacity = (num_blocks - 1) * block_size  # one spare block for a copy-on-write at the limit
        if args.max_model_len is None:
            if capacity < model_max:
                log.warning("KV pool holds %d tokens: max_model_len lowered from %d to %d", capacity + block_size,
                            model_max, capacity)
            return min(model_max, capacity)
        if args.max_model_len < 2:
            raise LowbitError(f"max_model_len must be at least 2, got {args.max_model_len}")
        if args.max_model_len > model_max:
            raise LowbitError(f"max_model_len={args.max_model_len} exceeds the model's max_position_embeddings "
                              f"({model_max})")
        if args.max_model_len > capacity:
            raise LowbitError(f"max_model_len={args.max_model_len} does not fit the KV pool ({capacity} tokens); "
                              "raise kv_cache_memory, use kv_cache_dtype int8/int4, or lower max_model_len")
        return args.max_model_len

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LowbitError("this model has no tokenizer: pass the prompt as a list of token ids")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise LowbitError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab = self.model_config.vocab_size
        try:
            if any(isinstance(t, bool) for t in ids):
                raise TypeError
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise LowbitError("prompt token ids must be integers") from None
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise LowbitError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise LowbitError("prompt is empty")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        session_id: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises LowbitError (and changes nothing) on bad input."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise LowbitError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if params.prompt_logprobs is not None:
            raise LowbitError("prompt_logprobs is not supported by this engine")
        if not isinstance(request_id, str) or not request_id:
            raise LowbitError("request_id must be a non-empty string")
        if request_id in self.groups:
            raise LowbitError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise LowbitError(f"prompt has {len(ids)} tokens but the context limit (max_model_len) is "
                              f"{self.max_model_len}, which must leave room for at least one output token")
        if session_id is not None:
            self._maybe_expire(force=True)
            self.sessions.begin_turn(str(session_id), request_id)
            session_id = str(session_id)
        group = SequenceGroup(request_id, prompt if isinstance(prompt, str) else None, ids, params,
                              self._new_seq_id(), session_id, arrival_time)
        self.groups[request_id] = group
        self._prompt_tokens += len(ids)
        self.scheduler.add(group.seqs[0])

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests now and free their blocks; returns their final outputs (finish_reason abort).
        Unknown or already finished ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outs = []
        now = time.monotonic()
        for rid in ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            for seq in group.seqs:
                if not seq.is_finished():
                    self.scheduler.remove(seq)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "abort"
            self.sessions.end_turn(group.session_id, rid, None)
            group.finished_time = now
            outs.append(group.to_output())
        return outs

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unreferenced blocks (vLLM's LLM.reset_prefix_cache)."""
        return self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def num_unfinished(self) -> int:
        return len(self.groups)

    def end_session(self, session_id: str) -> bool:
        return self.sessions.end(str(session_id))

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (a one-rank engine holds nothing to release)."""
        self.runner.close()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._maybe_expire()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        try:
            results = self.runner.execute(sched)
        except BaseException:
            # the step's K/V (and any copy-on-write) may be half written: recompute those sequences
            for s in sched.scheduled:
                if s.seq.status is SequenceStatus.RUNNING:
                    self.scheduler.preempt(s.seq)
            raise
        self.scheduler.step_done(sched)
        now = time.monotonic()
        touched: dict[str, SequenceGroup] = {}
        for r in results:
            group = r.seq.group
            seqs = self._fork(r.seq, len(r.samples)) if not group.forked else [r.seq]
            for seq, s in zip(seqs, r.samples):
                self._append(seq, s)
            self._generation_tokens += len(r.samples)
            if group.first_token_time is None:
                group.first_token_time = now
            touched[group.request_id] = group
        outs = []
        for rid, group in touched.items():
            if group.is_finished():
                group.finished_time = now
                del self.groups[rid]
            outs.append(group.to_output())
        return outs

    def _append(self, seq: Sequence, s: SampledToken) -> None:
        seq.append_token(s.token_id, s.logprob, s.top, self.tokenizer, self.eos_token_ids, self.max_model_len)
        if seq.is_finished():
            if seq.index == 0:
                self.sessions.end_turn(seq.group.session_id, seq.group.request_id, seq)
            self.scheduler.remove(seq)

    def _fork(self, seq: Sequence, n: int) -> list[Sequence]:
        """seq's prompt is done: split it into n samples sharing its blocks (copy-on-write later)."""
        group = seq.group
        out = [seq]
        for i in range(1, n):
            child = seq.fork(self._new_seq_id(), i, group.generators[i])
            self.block_manager.fork(seq, child)
            group.seqs.append(child)
            self.scheduler.add_running(child)
            out.append(child)
        group.forked = True
        return out

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def _maybe_expire(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_expiry > 1.0:
            self._last_expiry = now
            self.sessions.expire(now)

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        running = len({id(s.group) for s in self.scheduler.running})
        return EngineStats(
            num_running=running,
            num_waiting=len(self.groups) - running,
            kv_usage=bm.usage(),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_sessions=len(self.sessions),
            kv_cache_dtype=self.runner.spec.dtype,
            kv_capacity_tokens=self.runner.pool.num_tokens,
        )
