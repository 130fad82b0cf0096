"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine, plus vLLM's utility routes.

Guard middleware (API key, body-size limit) runs before any parsing, so an oversized or
unauthenticated request costs nothing; handlers live in completions.py and chat.py.
"""
from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST

from . import chat, completions
from .errors import APIError, error_body, install_error_handlers
from .metrics import ServerMetrics
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/ping"})


@dataclass
class ServerState:
    """Everything a handler needs, stored on app.state.lowbit."""

    engine: Any
    served_model_name: str
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    sessions: chat.ChatSessions
    model_root: str | None
    created: int

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.served_model_name}`.",
                           param="model", code="model_not_found")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_token_ids(self, ids: list[int], what: str = "prompt") -> None:
        bad = next((t for t in ids if not (0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise APIError(400, f"{what}: token id {bad} is out of range [0, {self.vocab_size})", param=what)


def get_state(request: Request) -> ServerState:
    return request.app.state.lowbit


class GuardMiddleware:
    """Pure ASGI: API-key check and body-size cap (Content-Length and the bytes actually received).

    The body is buffered (it is bounded) and replayed, and later receive() calls go to the server,
    so streaming responses still see the client's disconnect.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
            if not hmac.compare_digest(token, self.key):
                await _send_error(send, 401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                  code="invalid_api_key")
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_body:
                await _send_error(send, 413, f"request body too large ({declared} bytes; limit {self.max_body})",
                                  code="request_too_large")
                return
        if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await _send_error(send, 413, f"request body too large (over {self.max_body} bytes)",
                                  code="request_too_large")
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)


async def _send_error(send: Any, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(engine: Any, *, served_model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_root: str | None = None,
               allowed_origins: tuple[str, ...] | list[str] = ("*",)) -> FastAPI:
    """An OpenAI-compatible app over `engine` (an AsyncEngine or anything with its interface).

    CORS is open by default, as with vLLM, so browser chat UIs can call the API directly.
    """
    # strict_content_type=False: `curl -d '{...}'` (form content type) works, as with vLLM
    app = FastAPI(title="lowbit", docs_url=None, redoc_url=None, openapi_url=None, strict_content_type=False)
    cfg = engine.model_config
    args = getattr(engine, "args", None)
    state = ServerState(
        engine=engine,
        served_model_name=served_model_name,
        tokenizer=engine.tokenizer,
        max_model_len=int(engine.max_model_len),
        vocab_size=int(cfg.vocab_size),
        metrics=ServerMetrics(engine, served_model_name),
        sessions=chat.ChatSessions(engine, ttl=float(getattr(args, "session_ttl", 600.0)),
                                   max_sessions=int(getattr(args, "max_sessions", 256))),
        model_root=model_root,
        created=int(time.time()),
    )
    app.state.lowbit = state
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    if allowed_origins:  # added last = outermost: answers preflights before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.include_router(completions.router)
    app.include_router(chat.router)
    _add_utility_routes(app)
    return app


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread (tests, notebooks); yields the base URL, stops on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="lowbit-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread failed to start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _add_utility_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        s = get_state(request)
        card = ModelCard(id=s.served_model_name, created=s.created, root=s.model_root, max_model_len=s.max_model_len)
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> ModelCard:
        s = get_state(request)
        s.check_model(model_id)
        return ModelCard(id=s.served_model_name, created=s.created, root=s.model_root, max_model_len=s.max_model_len)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
        s = get_state(request)
        s.check_model(req.model)
        if req.messages is not None:
            if not req.messages:
                raise APIError(400, "messages must not be empty", param="messages")
            ids = chat.render_messages(s.tokenizer, [m.as_template_dict() for m in req.messages])
        else:
            ids = s.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        strs = s.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        s = get_state(request)
        s.check_model(req.model)
        s.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=s.decode(req.tokens))

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str, request: Request) -> dict:
        s = get_state(request)
        if not await run_in_threadpool(s.sessions.end, session_id):  # waits for the engine thread
            raise APIError(404, f"session {session_id!r} does not exist (ended or expired)", param="session_id",
                           code="session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}
