"""`lowbit chat`: interactive terminal chat on an in-process engine (no server needed).

The conversation is an engine session, so each turn prefills only the new text. Ctrl-C stops the
reply being streamed (the request is aborted, its KV blocks freed) without leaving the chat.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import uuid
from contextlib import aclosing
from typing import Any, TextIO

from ..errors import LowbitError
from .engine_flags import add_engine_args, add_model_arg, engine_args_from

PROMPT = ">>> "
HELP = "commands: /reset (new conversation), /exit (quit), /help; Ctrl-C stops a reply, Ctrl-D quits"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (streams replies; /reset, /exit)")
    add_model_arg(p)
    p.add_argument("--system", default=None, help="system message for the conversation")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn (for testing)")
    p.add_argument("--stats", action="store_true", help="after each reply print cached/new prompt tokens and speed")
    add_engine_args(p)
    p.set_defaults(func=run)


class Conversation:
    """One chat: message history + the token ids the engine's session holds."""

    def __init__(self, engine: Any, params: Any, system: str | None, out: TextIO = sys.stdout,
                 stats: bool = False):
        self.engine = engine
        self.params = params
        self.system = system
        self.out = out
        self.show_stats = stats
        self.reset(end=False)

    def reset(self, end: bool = True) -> None:
        if end:
            self.engine.end_session(self.session_id)
        self.session_id = f"chat-{uuid.uuid4().hex}"
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.history_ids: list[int] = []
        self.turns = 0

    async def turn(self, user_text: str) -> None:
        """Stream one reply; on cancellation (Ctrl-C) keep what was shown and return normally."""
        from ..serve.chat import session_prompt

        messages = self.messages + [{"role": "user", "content": user_text}]
        prompt = session_prompt(self.engine.tokenizer, self.history_ids, messages)
        room = int(self.engine.max_model_len) - len(prompt)
        if room <= 0:
            self._say(f"[the conversation ({len(prompt)} tokens) no longer fits the context "
                      f"({self.engine.max_model_len}); /reset to start over]")
            return
        max_tokens = min(self.params.max_tokens or room, room)
        params = dataclasses.replace(self.params, max_tokens=max_tokens)
        request_id = f"{self.session_id}-{self.turns}"
        self.turns += 1
        shown, final, t0, first = 0, None, time.perf_counter(), None
        interrupted = False
        try:
            async with aclosing(self.engine.generate(prompt, params, request_id, session_id=self.session_id)) as it:
                async for out in it:
                    final = out
                    text = out.outputs[0].text
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter()
                    if len(text) > shown:
                        self.out.write(text[shown:])
                        self.out.flush()
                        shown = len(text)
        except asyncio.CancelledError:
            interrupted = True
        self.out.write("\n")
        if interrupted:
            self._say("[interrupted]")
        if final is None:
            return
        c = final.outputs[0]
        reply = c.text[:shown] if interrupted else c.text
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.history_ids = list(prompt) + list(c.token_ids)
        if self.show_stats and first is not None:
            n = len(c.token_ids)
            rate = (n - 1) / (time.perf_counter() - first) if n > 1 else float("nan")
            self._say(f"[prompt {len(prompt)} tokens, {final.num_cached_tokens} cached (session or prefix cache); "
                      f"{n} tokens, first after {1000 * (first - t0):.0f} ms, {rate:.1f} tokens/s]")

    def _say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def repl(conv: Conversation, runner: asyncio.Runner, stdin: TextIO = sys.stdin) -> int:
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    conv._say(HELP)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            conv.out.write("\n")
            return 0
        except KeyboardInterrupt:
            conv.out.write("\n")
            conv._say("[Ctrl-C: type /exit to quit]")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            conv.reset()
            conv._say("[new conversation]")
            continue
        if cmd in ("/help", "/?"):
            conv._say(HELP)
            continue
        try:
            runner.run(conv.turn(line))
        except KeyboardInterrupt:  # a second Ctrl-C while the reply was being cancelled
            conv._say("\n[interrupted]")
        except LowbitError as e:
            conv._say(f"[error: {e}]")


def run(args: argparse.Namespace) -> int:
    from ..engine.async_engine import AsyncEngine
    from ..engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    if args.max_tokens < 1:
        raise LowbitError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    engine = AsyncEngine(engine_args_from(args))
    try:
        with asyncio.Runner() as runner:
            conv = Conversation(engine, params, args.system, stats=args.stats)
            return repl(conv, runner)
    finally:
        shutdown = getattr(engine, "shutdown", None) or getattr(engine, "close", None)
        if callable(shutdown):
            shutdown()
