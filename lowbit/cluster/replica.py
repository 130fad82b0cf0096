"""One replica: a Ray actor that owns one AsyncEngine, and the wire format of its outputs.

The actor is an *async* actor: Ray runs its methods on one event loop, so many requests stream
concurrently from one process while the AsyncEngine's own thread steps the model (the same split as
`lowbit serve`). `generate` is an async generator, which Ray turns into a streaming generator: the
ingress receives each output as its own object while the request is still running.

Outputs travel as deltas (what each choice gained since the previous message), not as the engine's
cumulative RequestOutputs: a cumulative stream costs O(tokens^2) bytes over the wire, a delta stream
O(tokens). The ingress rebuilds the cumulative outputs (`OutputAssembler`) that the serve layer reads.

Cores: the actor reserves `threads` Ray CPUs and runs torch with that many threads. With `cores`
given it also pins itself to them before the engine starts, so the engine thread and its OpenMP
workers (created later) inherit the mask: two replicas on one machine then never share a core.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..engine.args import EngineArgs
from ..engine.llm_engine import EngineStats
from ..engine.outputs import CompletionOutput, RequestOutput
from ..engine.sampling_params import SamplingParams
from ..logprobs import Logprob


# ---- wire format ----------------------------------------------------------------------------------


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None  # None when the request asked for no logprobs
    finish_reason: str | None
    stop_reason: int | str | None
    cumulative_logprob: float | None


@dataclass
class OutputDelta:
    choices: list[ChoiceDelta]
    finished: bool
    num_cached_tokens: int
    replica_seconds: float  # from the call's arrival in the replica to this output


@dataclass
class _Sent:
    text: int = 0
    tokens: int = 0
    logprobs: int = 0


class DeltaEncoder:
    """Cumulative RequestOutputs -> OutputDeltas (replica side)."""

    def __init__(self) -> None:
        self._sent: dict[int, _Sent] = {}

    def encode(self, out: RequestOutput, seconds: float) -> OutputDelta:
        choices = []
        for c in out.outputs:
            s = self._sent.setdefault(c.index, _Sent())
            lps = c.logprobs
            choices.append(ChoiceDelta(c.index, c.text[s.text:], list(c.token_ids[s.tokens:]),
                                       list(lps[s.logprobs:]) if lps is not None else None,
                                       c.finish_reason, c.stop_reason, c.cumulative_logprob))
            s.text, s.tokens, s.logprobs = len(c.text), len(c.token_ids), len(lps or [])
        return OutputDelta(choices, out.finished, int(out.num_cached_tokens or 0), seconds)


class OutputAssembler:
    """OutputDeltas -> the cumulative RequestOutputs the serve layer expects (ingress side)."""

    def __init__(self, request_id: str, prompt_ids: list[int]) -> None:
        self.out = RequestOutput(request_id, None, list(prompt_ids), [], False)
        self._by_index: dict[int, CompletionOutput] = {}
        self.replica_seconds = 0.0

    def apply(self, d: OutputDelta) -> RequestOutput:
        for cd in d.choices:
            c = self._by_index.get(cd.index)
            if c is None:
                c = self._by_index[cd.index] = CompletionOutput(cd.index, "", [],
                                                                logprobs=[] if cd.logprobs is not None else None)
                self.out.outputs.append(c)
                self.out.outputs.sort(key=lambda x: x.index)
            c.text += cd.text
            c.token_ids.extend(cd.token_ids)
            if cd.logprobs is not None:
                c.logprobs = c.logprobs if c.logprobs is not None else []
                c.logprobs.extend(cd.logprobs)
            c.finish_reason, c.stop_reason, c.cumulative_logprob = cd.finish_reason, cd.stop_reason, \
                cd.cumulative_logprob
        self.out.finished = d.finished
        self.out.num_cached_tokens = d.num_cached_tokens
        self.replica_seconds = d.replica_seconds
        return self.out


# ---- reports ------------------------------------------------------------------------------------


@dataclass
class ReplicaInfo:
    """What the ingress needs once: the engine's tokenizer and limits (the ingress tokenizes)."""

    tokenizer: Any
    model_config: Any
    max_model_len: int
    block_size: int
    args: EngineArgs


@dataclass
class ReplicaReport:
    """Polled by the ingress: health (incarnation), load and cache figures for /metrics."""

    incarnation: str  # node:pid:start time; changes when Ray restarts the actor
    node: str
    pid: int
    threads: int
    cores: list[int] | None
    stats: EngineStats
    session_blocks: int  # KV blocks referenced by idle sessions (in use, yet no request runs)
    generating: int  # generate calls in progress in this actor


# ---- the actor ----------------------------------------------------------------------------------


class EngineReplica:
    """Wrapped with ray.remote by replicas.py (this module imports no Ray, so it loads anywhere)."""

    def __init__(self, args: EngineArgs, threads: int, cores: list[int] | None = None) -> None:
        import torch

        from ..engine.async_engine import AsyncEngine

        if cores:
            os.sched_setaffinity(0, cores)
        self.cores = sorted(os.sched_getaffinity(0)) if cores else None
        self.threads = threads
        torch.set_num_threads(threads)  # before the engine's thread starts its first OpenMP region
        self.engine = AsyncEngine(args)
        self.pid = os.getpid()
        self.node = socket.gethostname()
        self.incarnation = f"{self.node}:{self.pid}:{time.time():.6f}"
        self.generating = 0

    async def warmup(self) -> None:
        """One 1-token request before the replica takes traffic: the first engine step loads (and
        may have to compile) the C++ kernels, which the first user request should not pay for."""
        params = SamplingParams(max_tokens=1, temperature=0)
        async for _ in self.engine.generate([0, 0], params, f"warmup-{self.incarnation}"):
            pass

    def info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(e.tokenizer, e.model_config, int(e.max_model_len), int(e.args.block_size), e.args)

    def report(self) -> ReplicaReport:
        held = self.engine.engine.sessions.num_blocks_held()
        return ReplicaReport(self.incarnation, self.node, self.pid, self.threads, self.cores,
                             self.engine.stats(), held, self.generating)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       session_id: str | None = None) -> AsyncIterator[OutputDelta]:
        t0 = time.monotonic()
        enc = DeltaEncoder()
        self.generating += 1
        try:
            async for out in self.engine.generate(prompt_ids, params, request_id, session_id=session_id):
                yield enc.encode(out, time.monotonic() - t0)
        finally:
            self.generating -= 1

    async def watch(self) -> None:
        """Never returns: the ingress keeps one call pending so that this replica's death fails it
        at once (Ray fails in-flight calls of a dead actor), even when no request is running."""
        await asyncio.Event().wait()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def end_session(self, session_id: str) -> bool:
        return await asyncio.to_thread(self.engine.end_session, session_id)  # waits for one engine step

    def shutdown(self) -> None:
        self.engine.shutdown()
