"""POST /v1/chat/completions and stateful chat sessions.

A session (LMDeploy's interactive mode) keeps the conversation on the server: the client sends only
its new messages; we append them to the stored history and pass the whole prompt with the session_id,
whose tokens START with the ones the engine already holds, so the engine prefills only the new text.
"""
from __future__ import annotations

import collections
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.background import BackgroundTask

from ..engine.outputs import CompletionOutput, RequestOutput
from ..engine.sampling_params import SamplingParams
from ..engine.session_store import SessionBusyError, SessionEntry, SessionLimitError, SessionStore
from ..errors import LowbitError
from ..logprobs import Logprob
from .completions import (
    SSE_DONE,
    collect,
    engine_deltas,
    ranked,
    resolve_max_tokens,
    sse,
    sse_error,
    streaming_response,
    token_text,
    until_disconnected,
    usage_of,
)
from .errors import APIError
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    random_id,
)

if TYPE_CHECKING:
    from .app import ServerState

router = APIRouter()
Message = dict[str, str]
MISSING_LOGPROB = -9999.0  # JSON has no -inf; vLLM uses the same stand-in


# ---- prompts ------------------------------------------------------------------------------------


def render_messages(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Chat template -> prompt token ids (with the generation prompt), via the engine's helper."""
    if not messages:
        raise LowbitError("messages must not be empty")
    from ..engine.chat_template import apply_chat_template

    ids = apply_chat_template(tokenizer, messages)
    if isinstance(ids, str):
        ids = tokenizer.encode(ids, add_special_tokens=False)
    return [int(t) for t in ids]


def session_prompt(tokenizer: Any, history_ids: list[int], conversation: list[Message]) -> list[int]:
    """Prompt ids for the whole conversation that start with `history_ids` whenever possible.

    Re-rendering the history re-tokenizes the model's replies, which can differ from the tokens it
    actually generated; then we keep the generated tokens and tokenize only the text after them.
    If even that fails, the fully rendered prompt is returned (the engine then prefills more: slower,
    never wrong).
    """
    full = render_messages(tokenizer, conversation)
    if not history_ids or full[: len(history_ids)] == history_ids:
        return full
    hist_text = tokenizer.decode(history_ids, skip_special_tokens=False)
    full_text = tokenizer.decode(full, skip_special_tokens=False)
    if len(full_text) > len(hist_text) and full_text.startswith(hist_text):
        tail = tokenizer.encode(full_text[len(hist_text):], add_special_tokens=False)
        return list(history_ids) + [int(t) for t in tail]
    return full


# ---- sessions -----------------------------------------------------------------------------------


@dataclass
class ChatSession(SessionEntry):
    messages: list[Message] = field(default_factory=list)  # the conversation so far, as the template sees it
    token_ids: list[int] = field(default_factory=list)  # prompt + reply tokens of the last finished turn


class ChatSessions:
    """Server-side conversation store, bounded in count and idle time like the engine's sessions
    (the same SessionStore); a session dropped for age or room is remembered, to answer 404."""

    def __init__(self, engine: Any, ttl: float = 600.0, max_sessions: int = 256):
        self.engine = engine
        self.max_sessions = max_sessions
        self._live: SessionStore[ChatSession] = SessionStore(ttl, max_sessions, ChatSession, on_drop=self._forget)
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()  # to answer 404, not forget

    def __len__(self) -> int:
        return len(self._live)

    def get(self, session_id: str) -> ChatSession | None:
        return self._live.get(session_id)

    def acquire(self, session_id: str, owner: str) -> ChatSession:
        """The session for one turn (created on first use), marked busy until release()."""
        self._live.expire()
        if session_id not in self._live and session_id in self._expired:
            raise APIError(404, f"session {session_id!r} expired (idle or evicted); its history is gone. "
                                "Start a new session id.", param="session_id", code="session_not_found")
        try:
            return self._live.acquire(session_id, owner)
        except SessionLimitError:
            raise APIError(429, f"too many active sessions ({self.max_sessions}); try again later") from None
        except SessionBusyError:
            raise APIError(409, f"session {session_id!r} is busy with another request", param="session_id") from None

    def commit(self, s: ChatSession, messages: list[Message], token_ids: list[int]) -> None:
        s.messages, s.token_ids = messages, token_ids

    def release(self, s: ChatSession, owner: str) -> None:
        """Idempotent: only the turn that acquired the session can release it."""
        self._live.release(s.session_id, owner)

    def end(self, session_id: str) -> bool:
        known = self._live.remove(session_id) is not None
        return self._end_in_engine(session_id) or known

    def _end_in_engine(self, session_id: str) -> bool:
        try:
            return bool(self.engine.end_session(session_id))
        except Exception:
            return False

    def _forget(self, s: ChatSession) -> None:
        """The store dropped s (idle too long, or evicted to make room): end it in the engine too."""
        self._end_in_engine(s.session_id)
        self._expired[s.session_id] = None
        while len(self._expired) > 4 * self.max_sessions:
            self._expired.popitem(last=False)


# ---- /v1/chat/completions -----------------------------------------------------------------------


def chat_logprobs(state: "ServerState", token_ids: list[int], entries: list[dict[int, Logprob]],
                  k: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid)
        s = token_text(state, tid, chosen)
        tops = [TopLogprob(token=(t_s := token_text(state, t, x)), logprob=max(x.logprob, MISSING_LOGPROB),
                           bytes=list(t_s.encode("utf-8"))) for t, x in ranked(entry, k)]
        lp = chosen.logprob if chosen is not None else MISSING_LOGPROB
        content.append(ChatTokenLogprob(token=s, logprob=max(lp, MISSING_LOGPROB), bytes=list(s.encode("utf-8")),
                                        top_logprobs=tops))
    return ChatLogprobs(content=content)


@dataclass
class _Turn:
    """One chat request, validated and tokenized, ready for the engine."""

    request_id: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    conversation: list[Message]
    session: ChatSession | None


def _prepare(state: "ServerState", req: ChatCompletionRequest) -> _Turn:
    state.check_model(req.model)
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    new = [m.as_template_dict() for m in req.messages]
    request_id = random_id("chatcmpl")
    session = state.sessions.acquire(req.session_id, request_id) if req.session_id else None
    try:
        conversation = (session.messages if session else []) + new
        prompt_ids = session_prompt(state.tokenizer, session.token_ids if session else [], conversation)
        max_tokens = resolve_max_tokens(state, len(prompt_ids), req.requested_max_tokens(),
                                        "max_completion_tokens", prompt_param="messages")
        params = req.sampling_params(max_tokens, req.requested_logprobs())
    except BaseException:
        if session:
            state.sessions.release(session, request_id)
        raise
    return _Turn(request_id, int(time.time()), prompt_ids, params, conversation, session)


def _commit(state: "ServerState", turn: _Turn, out: RequestOutput) -> None:
    c: CompletionOutput = out.outputs[0]
    if turn.session is not None and c.finish_reason in ("stop", "length"):
        state.sessions.commit(turn.session, turn.conversation + [{"role": "assistant", "content": c.text}],
                              turn.prompt_ids + list(c.token_ids))


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.lowbit
    turn = _prepare(state, req)
    if req.stream:
        release = BackgroundTask(state.sessions.release, turn.session, turn.request_id) if turn.session else None
        resp = streaming_response(_stream_chat(state, req, turn))
        resp.background = release
        return resp
    try:
        try:
            out = await until_disconnected(request, collect(state, turn.prompt_ids, turn.params, turn.request_id,
                                                            req.session_id))
        except* (APIError, LowbitError) as eg:
            raise eg.exceptions[0] from None
        _commit(state, turn, out)
    finally:
        if turn.session:
            state.sessions.release(turn.session, turn.request_id)
    k = req.top_logprobs or 0
    choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                          logprobs=chat_logprobs(state, c.token_ids, c.logprobs or [], k) if req.logprobs else None,
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in sorted(out.outputs, key=lambda c: c.index)]
    return ChatCompletionResponse(id=turn.request_id, created=turn.created, model=state.served_model_name,
                                  choices=choices, usage=usage_of([out]), session_id=req.session_id)


async def _stream_chat(state: "ServerState", req: ChatCompletionRequest, turn: _Turn) -> AsyncIterator[str]:
    model = state.served_model_name

    def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> str:
        return sse(ChatCompletionChunk(id=turn.request_id, created=turn.created, model=model, choices=choices,
                                       usage=usage))

    final: RequestOutput | None = None
    try:
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(req.n)])
        async with aclosing(engine_deltas(state, turn.prompt_ids, turn.params, turn.request_id,
                                          req.session_id)) as it:
            async for out, deltas in it:
                final = out
                choices = []
                for d in deltas:
                    lp = chat_logprobs(state, d.token_ids, d.logprobs, req.top_logprobs or 0) if req.logprobs else None
                    delta = DeltaMessage(content=d.text) if (d.text or d.token_ids) else DeltaMessage()
                    choices.append(ChatChunkChoice(index=d.index, delta=delta, logprobs=lp,
                                                   finish_reason=d.finish_reason, stop_reason=d.stop_reason))
                if choices:
                    yield chunk(choices)
        if final is not None:
            _commit(state, turn, final)
            if req.include_usage:
                yield chunk([], usage_of([final]))
    except Exception as e:
        yield sse_error(e)
    finally:
        if turn.session:
            state.sessions.release(turn.session, turn.request_id)
    yield SSE_DONE
