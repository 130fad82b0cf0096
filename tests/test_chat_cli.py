"""`lowbit chat` driven through pipes like a user at a terminal: streaming, Ctrl-C, /reset, /exit.

Runs the real default model in a child process (slow: loads the model once).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow

PROMPT = ">>> "


class Chat:
    """A `lowbit chat` child process with its stdout collected by a reader thread."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "chat", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.buf = b""
        self.reads = 0  # os.read calls that returned data: a streamed reply arrives in many
        self.lock = threading.Lock()
        self.stderr = b""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            with self.lock:
                self.buf += chunk
                self.reads += 1

    def _pump_err(self) -> None:
        self.stderr = self.proc.stderr.read()

    @property
    def text(self) -> str:
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 180.0) -> re.Match:
        """First match of `pattern` in the output after character `start` (fails the test on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, start)
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} in chat output:\n{self.text}\nstderr:\n{self.stderr.decode()[-2000:]}")
            time.sleep(0.02)

    def send(self, line: str) -> int:
        """Type a line; returns the output position where its answer starts."""
        pos = len(self.text)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return pos

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


STATS = r"\[prompt (\d+) tokens, (\d+) cached[^;]*; (\d+) tokens"


def test_chat_streams_interrupts_resets_and_exits():
    chat = Chat("--temperature", "0", "--max-tokens", "200", "--stats", "--kv-cache-memory", "64MiB")
    try:
        chat.wait_for(re.escape(PROMPT))

        # a long reply: text shows up while it is still being generated (no prompt back yet) ...
        pos = chat.send("Write a long story about a dragon who learns to paint.")
        reads_before = chat.reads
        m = chat.wait_for(r"\S[^\n]{40}", pos)
        assert PROMPT not in chat.text[m.end():], "the reply finished before any of it was shown"
        assert chat.reads - reads_before >= 2  # arrived in pieces, not all at the end
        # ... and Ctrl-C stops it without leaving the chat
        chat.proc.send_signal(signal.SIGINT)
        m = chat.wait_for(r"\[interrupted\]", pos)
        chat.wait_for(re.escape(PROMPT), m.end())
        assert chat.proc.poll() is None
        interrupted = re.search(STATS, chat.text[pos:])
        assert interrupted is not None and int(interrupted.group(3)) < 200

        # a fresh conversation, then a follow-up that reuses the first turn from the session
        pos = chat.send("/reset")
        m = chat.wait_for(r"\[new conversation\]", pos)
        pos = chat.send("What is 2+2?")
        s1 = chat.wait_for(STATS, pos)
        chat.wait_for(re.escape(PROMPT), s1.end())
        reply1 = chat.text[pos:s1.start()]
        assert re.search(r"\w", reply1)
        pos = chat.send("And 3+3?")
        s2 = chat.wait_for(STATS, pos)
        chat.wait_for(re.escape(PROMPT), s2.end())
        p1, out1 = int(s1.group(1)), int(s1.group(3))
        p2, cached2 = int(s2.group(1)), int(s2.group(2))
        assert p2 > p1 + out1  # turn 2's prompt holds the whole conversation
        assert cached2 >= p1 + out1 - 1  # and everything up to the end of turn 1 came from the session

        chat.send("/exit")
        assert chat.proc.wait(timeout=60) == 0
    finally:
        chat.close()


def test_chat_ends_on_eof():
    chat = Chat("--temperature", "0", "--max-tokens", "8", "--kv-cache-memory", "64MiB")
    try:
        chat.wait_for(re.escape(PROMPT))
        pos = chat.send("Hello!")
        chat.wait_for(re.escape(PROMPT), pos)
        assert chat.text[pos:].strip() != PROMPT.strip()  # something was answered
        chat.proc.stdin.close()  # Ctrl-D
        assert chat.proc.wait(timeout=60) == 0
    finally:
        chat.close()
