"""AsyncEngine: the LLMEngine driven by ONE background thread, for asyncio servers.

Requests, aborts and session ends are commands on a condition-guarded list; the engine thread
sleeps on the condition when it has nothing to do (no busy-waiting) and otherwise steps the engine
(torch releases the GIL during the heavy math, so the event loop stays responsive). Each request's
outputs go to its stream, which keeps only the LATEST cumulative output: a slow consumer skips
intermediate states but never misses text (outputs are cumulative) nor the final one.
Closing or cancelling a `generate` iterator aborts its request, freeing its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..errors import EngineDeadError, LowbitError
from .args import EngineArgs
from .llm_engine import EngineStats, LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("lowbit.engine")


class _Stream:
    """One request's mailbox, read on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.item: RequestOutput | BaseException | None = None

    def put(self, item: RequestOutput | BaseException) -> None:  # runs on self.loop
        if not isinstance(self.item, BaseException):
            self.item = item
            self.event.set()

    async def get(self) -> RequestOutput | BaseException:
        await self.event.wait()
        self.event.clear()
        item, self.item = self.item, None
        return item

    def send(self, item: RequestOutput | BaseException) -> bool:
        """From the engine thread; False if the consumer's loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.put, item)
            return True
        except RuntimeError:
            return False


class AsyncEngine:
    """The engine is built ON its thread when given args: the thread that first runs torch's
    parallel kernels owns the OpenMP worker team, and a second thread's parallel regions then run
    up to ~4x slower on a 2-core machine (measured: a 576x1536 fp32 linear 33 us on the owner
    thread, 135 us on another). So every parallel op, from weight loading and warm-up to each
    step, stays on one thread."""

    def __init__(self, args: EngineArgs | None = None, *, engine: LLMEngine | None = None) -> None:
        self._cv = threading.Condition()
        self._cmds: list[tuple] = []
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stopped = False
        self.dead = threading.Event()  # set when the engine can run no more steps (EngineDeadError)
        self._dead_error: BaseException | None = None
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(args, engine, built), name="lowbit-engine", daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()  # re-raises a load error here
        self.args = self.engine.args
        self.tokenizer: Any = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len

    def _main(self, args: EngineArgs | None, engine: LLMEngine | None, built: concurrent.futures.Future) -> None:
        try:
            self.engine = engine if engine is not None else LLMEngine(args)
            self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 (handed to the constructor's thread)
            built.set_exception(e)
            return
        built.set_result(self.engine)
        tp = getattr(self.engine.runner, "tp", None)
        if tp is not None:  # a rank dying while the server idles: fail and refuse at once
            tp.watch(self._rank_died)
        self._run()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "AsyncEngine":
        return cls(args)

    # ---- public API (event loop side) ----------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None,
        request_id: str,
        session_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes; LowbitError on bad input."""
        stream = _Stream(asyncio.get_running_loop())
        self._submit(("add", request_id, prompt, params, session_id, stream))
        done = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done:  # consumer went away (cancelled / closed): free the request now
                self._submit(("abort", request_id, False))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if still read) gets a final output with finish_reason abort."""
        self._submit(("abort", request_id, True))

    def end_session(self, session_id: str) -> bool:
        """Drop a session and its cached KV; False if there was none. Waits for the engine thread
        (at most one step)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("end_session", session_id, fut))
        return bool(fut.result(timeout=300))

    def stats(self) -> EngineStats:
        """Snapshot taken by the engine thread after its last step."""
        return self._stats

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    close = shutdown

    def _die(self, error: EngineDeadError) -> None:
        """The engine can run no more steps: fail every request, refuse new ones, tell the server."""
        log.error("engine stopped: %s", error)
        with self._cv:
            self._dead_error = error
        self._fail_all(error)
        self.dead.set()

    def _rank_died(self, reason: str) -> None:
        try:
            self._submit(("dead", reason))
        except LowbitError:  # already shut down
            pass

    def _submit(self, cmd: tuple) -> None:
        with self._cv:
            if self._dead_error is not None and cmd[0] == "add":
                raise EngineDeadError(str(self._dead_error))
            if self._stopped and cmd[0] != "abort":
                raise LowbitError("the engine has been shut down")
            self._cmds.append(cmd)
            self._cv.notify()

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._cmds and not self._stopped and not self.engine.has_unfinished():
                    self._cv.wait()
                cmds, self._cmds = self._cmds, []
                stopped = self._stopped
            for cmd in cmds:
                self._apply(cmd)
            if stopped:
                self._fail_all(LowbitError("the engine has been shut down"))
                self.engine.close()
                return
            if self.engine.has_unfinished():
                try:
                    self._deliver(self.engine.step())
                except EngineDeadError as e:  # a tensor-parallel rank died: no more steps
                    self._die(e)
                except Exception as e:  # a bug or out of memory: fail the requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
            self._stats = self.engine.stats()

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, session_id, stream = cmd
            try:
                self.engine.add_request(rid, prompt, params, session_id=session_id)
            except Exception as e:
                stream.send(e)
                return
            self._streams[rid] = stream
        elif kind == "abort":
            _, rid, notify = cmd
            outs = self.engine.abort_request(rid)
            stream = self._streams.pop(rid, None)
            if notify and stream is not None:
                for out in outs:
                    stream.send(out)
        elif kind == "dead":
            if self._dead_error is None:
                self._die(EngineDeadError(cmd[1]))
        elif kind == "end_session":
            _, sid, fut = cmd
            try:
                fut.set_result(self.engine.end_session(sid))
            except Exception as e:
                fut.set_exception(e)
        self._stats = self.engine.stats()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            delivered = stream.send(out)
            if out.finished or not delivered:
                del self._streams[out.request_id]
                if not out.finished:  # its event loop is gone: nobody will read it
                    self.engine.abort_request(out.request_id)

    def _fail_all(self, err: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            stream.send(err)
        self.engine.abort_request(list(self.engine.groups))
        self._streams.clear()
