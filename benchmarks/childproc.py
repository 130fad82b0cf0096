"""Run one child process and measure it: wall time and the child's own peak RSS.

Why a child: a benchmark that quantizes in its own process would report the peak of everything it did
before (loading the FP model for its perplexity, say). os.wait4 gives the rusage of exactly the one
child it reaps, where RUSAGE_CHILDREN would be the maximum over every child so far.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass
class ChildRun:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    output: str  # stdout + stderr, the last 20,000 characters

    def tail(self, n: int = 3000) -> str:
        return self.output[-n:]

    def last_line(self) -> str:
        lines = [ln for ln in self.output.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}, no output"


def run_child(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> ChildRun:
    """Run cmd to completion (output captured in a temp file, so a chatty child cannot block on a pipe)."""
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        log.seek(0)
        out = log.read()[-20000:]
    # ru_maxrss is in KiB on Linux
    return ChildRun(proc.returncode, seconds, usage.ru_maxrss * 1024, out)
