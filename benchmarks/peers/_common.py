"""Helpers shared by the peer runners (standard library only: they run in three different venvs).

Each runner prints exactly ONE JSON object on stdout; everything else (progress, engine logs) goes to
stderr. `emit()` enforces that by writing the object to the real stdout saved at import time, while
`quiet_stdout()` sends anything an engine prints on stdout to stderr instead.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import signal
import socket
import statistics
import sys
import time
import urllib.request

_REAL_STDOUT = sys.stdout


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_stdout():
    """Redirect Python-level stdout to stderr (engines that print progress on stdout)."""
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = old


def redirect_fd1_to_stderr() -> None:
    """Point file descriptor 1 at stderr for the whole process (C/C++ libraries and child processes
    that write to fd 1); the JSON still goes out on the original stdout, duplicated first."""
    global _REAL_STDOUT
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _REAL_STDOUT = os.fdopen(saved, "w", buffering=1)
    sys.stdout = sys.stderr


def emit(obj: dict) -> None:
    _REAL_STDOUT.write(json.dumps(obj, sort_keys=False) + "\n")
    _REAL_STDOUT.flush()


def median(xs):
    return statistics.median(xs) if xs else None


def now() -> float:
    return time.perf_counter()


def machine_info() -> dict:
    flags = set()
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        n_aff = len(os.sched_getaffinity(0))
    except AttributeError:
        n_aff = os.cpu_count()
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {
        "cpu": model,
        "cpus_usable": n_aff,
        "mem_gib": mem_gib,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "loadavg_1m_at_start": load1,
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


BUSY_LOADAVG = 0.5


def base_result(peer: str, mode: str, args) -> dict:
    m = machine_info()
    res = {
        "peer": peer,
        "mode": mode,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": m,
        "args": {k: v for k, v in vars(args).items()},
    }
    load = m.get("loadavg_1m_at_start")
    if load is not None and load > BUSY_LOADAVG:
        # Other processes on the cores: engines that spin at thread barriers (llama.cpp, OpenMP) slow
        # down by large factors when a thread is preempted, so these figures are not comparable.
        res["warning"] = (f"machine busy before the run (1-min load {load:.2f} on {m.get('cpus_usable')} cpus):"
                          " timings are unreliable; rerun on an idle machine")
        log("WARNING:", res["warning"])
    return res


def decode_summary(ttfts, decode_tps, e2e_s, output_len) -> dict:
    """Medians over runs of the batch-1 figures."""
    return {
        "ttft_s": median(ttfts),
        "decode_tokens_per_s": median(decode_tps),
        "e2e_s": median(e2e_s),
        "e2e_output_tokens_per_s": output_len / median(e2e_s) if e2e_s else None,
        "runs": {"ttft_s": ttfts, "decode_tokens_per_s": decode_tps, "e2e_s": e2e_s},
    }


def throughput_summary(wall_s, num_prompts, input_len, output_len) -> dict:
    m = median(wall_s)
    tot_in, tot_out = num_prompts * input_len, num_prompts * output_len
    return {
        "wall_s": m,
        "total_tokens_per_s": (tot_in + tot_out) / m,
        "output_tokens_per_s": tot_out / m,
        "requests_per_s": num_prompts / m,
        "input_tokens": tot_in,
        "output_tokens": tot_out,
        "runs": {"wall_s": wall_s},
    }


def free_port() -> int:
    """A free loopback TCP port for a server this benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ready(url: str, proc, timeout: float, poll_s: float = 0.5) -> None:
    """Polls GET url until it answers 200; RuntimeError if proc exits, TimeoutError after timeout."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"server not ready after {timeout:.0f} s ({url})")


def exit_on_sigterm() -> None:
    """SIGTERM (`timeout`, a CI cancel) raises SystemExit like Ctrl-C raises KeyboardInterrupt, so
    the `finally` blocks that stop this benchmark's servers run; by default SIGTERM ends Python
    on the spot and leaves every server it started (and a Ray instance) running."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def stop_process_group(proc, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Sends sig to the server's process group (started with start_new_session=True), waits up to
    timeout, then SIGKILLs it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except Exception:  # subprocess.TimeoutExpired
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
