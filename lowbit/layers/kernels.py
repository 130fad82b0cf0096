"""Loads the AVX2 quantized-linear extension (lowbit/layers/csrc/qgemm.cpp) on first use.

Why JIT: the kernels need a C++ compiler only on machines that actually serve, and building at
first use keeps the wheel pure-Python. The build is cached (TORCH_EXTENSIONS_DIR, else
~/.cache/lowbit/ext) keyed by a hash of the source, so a rebuild happens only when the source
changes. If the build or the import fails (no compiler, no AVX2), callers fall back to pure
torch code and we warn once.

Set LOWBIT_NO_EXT=1 to force the fallback (used by tests and for A/B comparisons).
"""
from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).parent / "csrc" / "qgemm.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]

_ext: ModuleType | None = None
_tried = False
_warned = False
_disabled: bool | None = None  # LOWBIT_NO_EXT, read once (reset() re-reads it)
_lock = threading.Lock()  # one build even if several threads hit the first forward at once


def disabled() -> bool:
    """True when the user asked for the pure-torch path."""
    return os.environ.get("LOWBIT_NO_EXT", "").strip() not in ("", "0")


def _cpu_has_avx2_fma() -> bool:
    """Checks /proc/cpuinfo so we never execute AVX2 code on a CPU that lacks it."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return True  # not Linux: let the compiler/import decide
    return "avx2" in flags and "fma" in flags and "f16c" in flags


def _build_dir() -> Path:
    """Cache directory for the compiled module, one per source hash."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "lowbit" / "ext")
    return Path(root)


def _module_name() -> str:
    """Name tied to the source and flags, so a stale build is never loaded."""
    digest = hashlib.sha1(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:10]
    return f"lowbit_qgemm_{digest}"


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"lowbit: fast CPU quantized kernels unavailable ({reason}); "
            "using the slower pure-torch path.",
            RuntimeWarning,
            stacklevel=3,
        )


def _load() -> ModuleType:
    """Compiles (or reuses the cached build of) the extension."""
    from torch.utils.cpp_extension import load

    name = _module_name()
    build = _build_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=os.environ.get("LOWBIT_EXT_VERBOSE", "") not in ("", "0"),
    )


def reset() -> None:
    """Forgets the cached decision, so LOWBIT_NO_EXT is read again (tests flip it)."""
    global _ext, _tried, _warned, _disabled
    _ext, _tried, _warned, _disabled = None, False, False, None


def get() -> ModuleType | None:
    """The compiled module, or None (with one warning) when it cannot be used.

    The decision is cached: this sits on the per-token path, so it must be a few attribute reads.
    """
    global _ext, _tried, _disabled
    if _disabled is None:
        _disabled = disabled()
    if _disabled:
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _ext = _resolve()
                _tried = True
    return _ext


def _resolve() -> ModuleType | None:
    """Builds/loads the extension, or returns None after warning why it cannot be used."""
    if not _cpu_has_avx2_fma():
        _warn_once("CPU lacks AVX2/FMA/F16C")
    elif not _SOURCE.exists():
        _warn_once(f"missing kernel source {_SOURCE}")
    else:
        try:
            return _load()
        except Exception as exc:  # compiler missing, headers missing, link error...
            lines = str(exc).strip().splitlines()
            _warn_once(f"{type(exc).__name__}: {lines[-1] if lines else ''}")
    return None


def available() -> bool:
    """Whether the fast kernels will be used."""
    return get() is not None
