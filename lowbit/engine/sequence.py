"""Sequences (one sample's tokens, KV bookkeeping, detokenized text) and SequenceGroups (a request).

A request with n > 1 starts as ONE sequence: the prompt is prefilled once, n tokens are drawn from
its last logits, and the sequence forks into n that share the prompt's KV blocks (copy-on-write).
Each sample has its own torch.Generator seeded from SamplingParams.seed, so a seeded request
draws the same tokens whatever else is in the batch.
"""
from __future__ import annotations

import enum
import time
from typing import Any

import torch

from ..logprobs import Logprob
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

_DETOK_CONTEXT = 5  # prompt tokens decoded before the first output token (keeps leading spaces right)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # freed for lack of KV blocks; waits to be recomputed
    FINISHED = "finished"


def sample_generator(seed: int | None, index: int) -> torch.Generator | None:
    """Sample `index` of a request seeded with `seed`: index 0 uses the seed itself."""
    if seed is None:
        return None
    s = seed if index == 0 else (seed * 0x9E3779B1 + index * 0x85EBCA77) % (2**63)
    return torch.Generator().manual_seed(s)


class Sequence:
    def __init__(self, seq_id: int, group: "SequenceGroup", index: int, generator: torch.Generator | None) -> None:
        self.seq_id = seq_id
        self.group = group
        self.index = index  # CompletionOutput.index
        self.prompt_token_ids = group.prompt_token_ids
        self.prompt_len = len(self.prompt_token_ids)
        self.token_ids: list[int] = list(self.prompt_token_ids)  # prompt + output
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.generator = generator
        # KV bookkeeping (owned by the block manager / scheduler)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_hashes: list[bytes] = []  # prefix-cache hash chain over full blocks of token_ids
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        # output state
        self.output_text = ""
        self.prefix_offset = max(self.prompt_len - _DETOK_CONTEXT, 0)
        self.read_offset = self.prompt_len
        # like vLLM: tracked only when logprobs are requested (the sampler computes them only then)
        self.cumulative_logprob: float | None = 0.0 if group.params.logprobs is not None else None
        self.logprobs: list[dict[int, Logprob]] | None = [] if group.params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """After preemption: nothing is cached any more; the whole token list will be prefilled again."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.status = SequenceStatus.PREEMPTED

    def fork(self, seq_id: int, index: int, generator: torch.Generator | None) -> "Sequence":
        """A sibling sharing everything so far (the caller takes block references for it)."""
        child = Sequence(seq_id, self.group, index, generator)
        child.token_ids = list(self.token_ids)
        child.output_token_ids = list(self.output_token_ids)
        child.status = self.status
        child.block_table = list(self.block_table)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        child.output_text = self.output_text
        child.prefix_offset, child.read_offset = self.prefix_offset, self.read_offset
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        return child

    # ---- new tokens --------------------------------------------------------------------------
    def append_token(
        self,
        token: int,
        logprob: float,
        top: dict[int, Logprob] | None,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        max_model_len: int,
    ) -> None:
        """Add a sampled token, extend the text, and decide whether the sequence is done."""
        self.token_ids.append(token)
        self.output_token_ids.append(token)
        if self.cumulative_logprob is not None:
            self.cumulative_logprob += logprob
        if self.logprobs is not None:
            if top is not None and tokenizer is not None:
                for tid, lp in top.items():
                    if lp.decoded_token is None:
                        lp.decoded_token = tokenizer.decode([tid])
            self.logprobs.append(top or {token: Logprob(logprob)})
        p = self.params
        n_out = len(self.output_token_ids)
        stopped_by_token = False
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                self.finish_reason, self.stop_reason, stopped_by_token = "stop", token, True
            elif not p.ignore_eos and token in eos_token_ids:
                self.finish_reason, stopped_by_token = "stop", True
        if tokenizer is not None and (not stopped_by_token or p.include_stop_str_in_output):
            delta = self._detokenize(tokenizer)
            if delta and p.stop and n_out >= p.min_tokens and self.finish_reason is None:
                self._check_stop_strings(len(delta))
        if self.finish_reason is None and (
            (p.max_tokens is not None and n_out >= p.max_tokens) or self.num_tokens >= max_model_len
        ):
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status = SequenceStatus.FINISHED

    def _detokenize(self, tokenizer: Any) -> str:
        """Incremental detokenization (prefix/read offsets): decode a short window around the new
        token and emit the text it adds; wait while the window ends in an incomplete UTF-8 char."""
        skip = self.params.skip_special_tokens
        ids = self.token_ids
        prefix_text = tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        new_text = tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.output_text += delta
        return delta

    def _check_stop_strings(self, delta_len: int) -> None:
        text, best = self.output_text, None
        for s in self.params.stop:
            idx = text.find(s, max(0, len(text) - delta_len - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            idx, s = best
            self.output_text = text[: idx + len(s)] if self.params.include_stop_str_in_output else text[:idx]
            self.finish_reason, self.stop_reason = "stop", s

    def visible_text(self) -> str:
        """Output text minus a tail that may still grow into a stop string (so streamed text never
        has to be taken back)."""
        text = self.output_text
        if self.finish_reason is not None or not self.params.stop or not text:
            return text
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[: len(text) - hold] if hold else text

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class SequenceGroup:
    """One request: its prompt, params and the n sequences sampling from it."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first_seq_id: int,
        session_id: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.session_id = session_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_cached_tokens = 0
        self.generators = [sample_generator(params.seed, i) for i in range(params.n)]
        self.seqs = [Sequence(first_seq_id, self, 0, self.generators[0])]
        self.forked = params.n == 1

    @property
    def n(self) -> int:
        return self.params.n

    def is_finished(self) -> bool:
        return self.forked and all(s.is_finished() for s in self.seqs)

    def to_output(self) -> RequestOutput:
        outs = [s.to_output() for s in self.seqs]
        metrics = {"arrival_time": self.arrival_time}
        if self.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = self.first_scheduled_time
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        if self.finished_time is not None:
            metrics["finished_time"] = self.finished_time
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outs,
            finished=self.finished_time is not None,
            num_cached_tokens=self.num_cached_tokens,
            metrics=metrics,
        )
