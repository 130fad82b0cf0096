"""POST /v1/completions, plus the generation plumbing chat.py shares with it.

The engine yields CUMULATIVE RequestOutputs (vLLM style); `engine_deltas` turns them into per-choice
deltas once, so both endpoints stream the same way. Every exit path (finish, error, client gone,
cancellation) aborts the engine request, so its KV blocks are freed at once.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from ..errors import LowbitError
from ..logprobs import Logprob
from .errors import APIError, error_body, exception_status
from .metrics import RequestTimer
from .protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
    random_id,
)

if TYPE_CHECKING:
    from .app import ServerState

router = APIRouter()
T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- shared plumbing ----------------------------------------------------------------------------


@dataclass
class Delta:
    """What one choice gained since the previous engine output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class _Seen:
    text_len: int = 0
    n_tokens: int = 0
    n_logprobs: int = 0
    done: bool = False


async def engine_deltas(state: "ServerState", prompt_ids: list[int], params: SamplingParams, request_id: str,
                        session_id: str | None = None) -> AsyncIterator[tuple[RequestOutput, list[Delta]]]:
    """Iterate the engine's cumulative outputs as (output, deltas of the choices that changed)."""
    timer = RequestTimer(state.metrics)
    seen = [_Seen() for _ in range(params.n)]
    final: RequestOutput | None = None
    agen = state.engine.generate(prompt_ids, params, request_id, session_id=session_id)
    try:
        async for out in agen:
            final = out
            deltas: list[Delta] = []
            for c in out.outputs:
                s = seen[c.index]
                if s.done:
                    continue
                d = Delta(c.index, c.text[s.text_len:], list(c.token_ids[s.n_tokens:]),
                          list((c.logprobs or [])[s.n_logprobs:]), c.finish_reason, c.stop_reason)
                s.text_len, s.n_tokens = len(c.text), len(c.token_ids)
                s.n_logprobs = len(c.logprobs or [])
                s.done = c.finish_reason is not None
                if d.text or d.token_ids or d.finish_reason is not None:
                    deltas.append(d)
            if any(d.token_ids for d in deltas):
                timer.on_tokens()
            yield out, deltas
    finally:
        if final is None or not final.finished:
            with anyio.CancelScope(shield=True):  # we may be inside a cancelled scope (client gone)
                await agen.aclose()
                try:
                    await state.engine.abort(request_id)
                except Exception:  # already finished / unknown id: nothing left to free
                    pass
        timer.on_finish([c.finish_reason for c in final.outputs] if final else [None])


async def collect(state: "ServerState", prompt_ids: list[int], params: SamplingParams, request_id: str,
                  session_id: str | None = None) -> RequestOutput:
    """Run one request to completion and return its final output."""
    final: RequestOutput | None = None
    async with aclosing(engine_deltas(state, prompt_ids, params, request_id, session_id)) as it:
        async for out, _ in it:
            final = out
    if final is None:
        raise APIError(500, "the engine returned no output")
    return final


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as (stream index, item); closing this closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for x in only:
                yield 0, x
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, s: AsyncIterator[T]) -> None:
        try:
            async with aclosing(s):  # type: ignore[type-var]
                async for x in s:
                    await queue.put((i, x, None))
        except Exception as e:
            queue.put_nowait((i, end, e))
            return
        queue.put_nowait((i, end, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, x, err = await queue.get()
            if err is not None:
                raise err
            if x is end:
                remaining -= 1
                continue
            yield i, x
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    return sse(error_body(*exception_status(exc)))


def streaming_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(int(o.num_cached_tokens or 0) for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def resolve_max_tokens(state: "ServerState", prompt_len: int, requested: int | None, param: str,
                       prompt_param: str = "prompt") -> int:
    """Tokens to generate: the request's, or all the context left; 400 if the context cannot hold it."""
    limit = state.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                            f"{prompt_len} tokens. Please shorten the prompt.", param=prompt_param,
                       code="context_length_exceeded")
    room = limit - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                            f"completion). Please reduce the prompt or {param}.", param=param,
                       code="context_length_exceeded")
    return requested


def token_text(state: "ServerState", token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.tokenizer.decode([token_id])


def ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The top-k alternatives of one position, best first."""
    items = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                  -kv[1].logprob))
    return items[:k]


# ---- /v1/completions ----------------------------------------------------------------------------


@dataclass
class _Prompt:
    text: str | None  # None for token-id prompts (decoded lazily for echo)
    ids: list[int]
    params: SamplingParams


def legacy_logprobs(state: "ServerState", token_ids: list[int], entries: list[dict[int, Logprob]], k: int,
                    offset: int, prompt_ids: list[int] | None = None) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy completions logprobs (tokens, token_logprobs, top_logprobs, text_offset)."""
    lp = CompletionLogprobs()
    for tid in prompt_ids or []:
        s = token_text(state, tid, None)
        lp.tokens.append(s)
        lp.token_logprobs.append(None)
        lp.top_logprobs.append(None)
        lp.text_offset.append(offset)
        offset += len(s)
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid)
        s = token_text(state, tid, chosen)
        lp.tokens.append(s)
        lp.token_logprobs.append(chosen.logprob if chosen is not None else None)
        top: dict[str, float] = {}
        for t, x in ranked(entry, k):  # best first; tokens that decode alike keep the best logprob
            top.setdefault(token_text(state, t, x), x.logprob)
        if chosen is not None:
            top.setdefault(s, chosen.logprob)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(s)
    return lp, offset


def _prepare(state: "ServerState", req: CompletionRequest) -> list[_Prompt]:
    state.check_model(req.model)
    prompts: list[_Prompt] = []
    for p in req.prompt_list():
        if isinstance(p, str):
            ids = state.encode(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            text: str | None = p
        else:
            state.check_token_ids(p)
            ids, text = list(p), None
        max_tokens = resolve_max_tokens(state, len(ids), req.max_tokens, "max_tokens")
        prompts.append(_Prompt(text, ids, req.sampling_params(max_tokens, req.logprobs)))
    return prompts


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.lowbit
    prompts = _prepare(state, req)
    rid = random_id("cmpl")
    created = int(time.time())
    if req.stream:
        return streaming_response(_stream_completion(state, req, prompts, rid, created))

    async def run_all() -> list[RequestOutput]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(collect(state, p.ids, p.params, f"{rid}-{i}")) for i, p in enumerate(prompts)]
        return [t.result() for t in tasks]

    try:
        outs = await until_disconnected(request, run_all())
    except* (APIError, LowbitError) as eg:
        raise eg.exceptions[0] from None
    choices: list[CompletionChoice] = []
    for pi, (p, out) in enumerate(zip(prompts, outs)):
        prefix = _echo_text(state, p) if req.echo else ""
        for c in sorted(out.outputs, key=lambda c: c.index):
            lp = None
            if req.logprobs is not None:
                lp, _ = legacy_logprobs(state, c.token_ids, c.logprobs or [], req.logprobs, 0,
                                        p.ids if req.echo else None)
            choices.append(CompletionChoice(index=pi * req.n + c.index, text=prefix + c.text, logprobs=lp,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return CompletionResponse(id=rid, created=created, model=state.served_model_name, choices=choices,
                              usage=usage_of(outs))


def _echo_text(state: "ServerState", p: _Prompt) -> str:
    return p.text if p.text is not None else state.decode(p.ids)


async def _stream_completion(state: "ServerState", req: CompletionRequest, prompts: list[_Prompt], rid: str,
                             created: int) -> AsyncIterator[str]:
    offsets: dict[int, int] = {}
    finals: dict[int, RequestOutput] = {}
    streams = [engine_deltas(state, p.ids, p.params, f"{rid}-{i}") for i, p in enumerate(prompts)]
    try:
        async with aclosing(merged(streams)) as it:
            async for pi, (out, deltas) in it:
                finals[pi] = out
                choices = []
                for d in deltas:
                    idx = pi * req.n + d.index
                    first = idx not in offsets
                    text = (_echo_text(state, prompts[pi]) if (req.echo and first) else "") + d.text
                    lp = None
                    if req.logprobs is not None:
                        lp, offsets[idx] = legacy_logprobs(state, d.token_ids, d.logprobs, req.logprobs,
                                                           offsets.get(idx, 0),
                                                           prompts[pi].ids if (req.echo and first) else None)
                    else:
                        offsets[idx] = offsets.get(idx, 0) + len(text)
                    choices.append(CompletionChoice(index=idx, text=text, logprobs=lp,
                                                    finish_reason=d.finish_reason, stop_reason=d.stop_reason))
                if choices:
                    yield sse(CompletionChunk(id=rid, created=created, model=state.served_model_name,
                                              choices=choices))
        if req.include_usage:
            usage = usage_of([finals[i] for i in sorted(finals)])
            yield sse(CompletionChunk(id=rid, created=created, model=state.served_model_name, choices=[],
                                      usage=usage))
    except Exception as e:
        yield sse_error(e)
    yield SSE_DONE
