"""Run one child process and measure it: wall time and the child's own peak RSS.

Why a child: a benchmark that quantizes in its own process would report the peak of everything it did
before (loading the FP model for its perplexity, say).

Why through a small launcher: Linux starts a new program's ru_maxrss at the high-water mark of the
address space it replaced at exec, i.e. of the fork of the process that started it. A child started
straight from a benchmark holding 3.4 GB reports at least 3.4 GB whatever it does (measured: two RTN
quantizations of the 0.5B reported the same 3,450,568,704 bytes, the parent's size). So a fresh, small
Python forks and execs the command and reports what os.wait4 says about exactly that process (and its
own waited-for children, e.g. a compiler the job starts), the way `/usr/bin/time -v` does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# argv: rss_file command...; exit status: the command's (128 + signal when killed by one)
_LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        sys.stderr.write(f"cannot run {sys.argv[2]}: {exc}\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


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
    with tempfile.TemporaryDirectory(prefix="lowbit-child-") as tmp:
        rss_file = os.path.join(tmp, "maxrss")
        with open(os.path.join(tmp, "log"), "w+", encoding="utf-8", errors="replace") as log:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _LAUNCHER, rss_file, *cmd], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=cwd)
            seconds = time.perf_counter() - t0
            log.seek(0)
            out = log.read()[-20000:]
        try:
            with open(rss_file) as f:
                kib = int(f.read())  # ru_maxrss is in KiB on Linux
        except (OSError, ValueError):
            kib = 0
    return ChildRun(proc.returncode, seconds, kib * 1024, out)
