"""Loads the AVX2 C++ extensions on first use: the quantized linear kernels (csrc/qgemm.cpp, via
`get()`) and the fused decode ops (csrc/ops.cpp, via `OPS.get()`), one loader for both.

Why JIT: the kernels need a C++ compiler only on machines that actually serve, and building at
first use keeps the wheel pure-Python. Each build is cached (TORCH_EXTENSIONS_DIR, else
~/.cache/lowbit/ext) keyed by a hash of its sources and flags, so a rebuild happens only when a
source changes. If the build or the import fails (no compiler, no AVX2), callers fall back to pure
torch code and we warn once per extension.

Both modules use torch's own OpenMP runtime (the extension's libgomp resolves to the one torch
already loaded), so at::parallel_for in either shares torch's intra-op thread pool.

Set LOWBIT_NO_EXT=1 to force the fallback (used by tests and for A/B comparisons).
"""
from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

_CSRC = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]


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
    """Cache directory for the compiled modules, one subdirectory per source hash."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "lowbit" / "ext")
    return Path(root)


class JitExtension:
    """One C++ module built from `sources` on first use; `get()` is the per-token entry point."""

    def __init__(self, prefix: str, sources: list[Path], what: str) -> None:
        self.prefix = prefix
        self.sources = sources
        self.what = what  # for the fallback warning
        self._ext: ModuleType | None = None
        self._tried = False
        self._warned = False
        self._disabled: bool | None = None  # LOWBIT_NO_EXT, read once (reset() re-reads it)
        self._lock = threading.Lock()  # one build even if several threads hit the first forward

    def module_name(self) -> str:
        """Name tied to the sources and flags, so a stale build is never loaded."""
        h = hashlib.sha1()
        for src in self.sources:
            h.update(src.read_bytes())
        h.update(" ".join(_FLAGS).encode())
        return f"{self.prefix}_{h.hexdigest()[:10]}"

    def reset(self) -> None:
        """Forgets the cached decision, so LOWBIT_NO_EXT is read again (tests flip it)."""
        self._ext, self._tried, self._warned, self._disabled = None, False, False, None

    def get(self) -> ModuleType | None:
        """The compiled module, or None (with one warning) when it cannot be used.

        The decision is cached: this sits on the per-token path, so it must be a few attribute reads.
        """
        if self._disabled is None:
            self._disabled = disabled()
        if self._disabled:
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._ext = self._resolve()
                    self._tried = True
        return self._ext

    def available(self) -> bool:
        """Whether the fast kernels will be used."""
        return self.get() is not None

    def _warn_once(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"lowbit: fast CPU {self.what} unavailable ({reason}); using the slower pure-torch path.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _resolve(self) -> ModuleType | None:
        """Builds/loads the extension, or returns None after warning why it cannot be used."""
        missing = [s for s in self.sources if not s.exists()]
        if not _cpu_has_avx2_fma():
            self._warn_once("CPU lacks AVX2/FMA/F16C")
        elif missing:
            self._warn_once(f"missing kernel source {missing[0]}")
        else:
            try:
                return _load(self)
            except Exception as exc:  # compiler missing, headers missing, link error...
                lines = str(exc).strip().splitlines()
                self._warn_once(f"{type(exc).__name__}: {lines[-1] if lines else ''}")
        return None


def _load(ext: JitExtension) -> ModuleType:
    """Compiles (or reuses the cached build of) one extension."""
    from torch.utils.cpp_extension import load

    name = ext.module_name()
    build = _build_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name=name,
        sources=[str(s) for s in ext.sources],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=os.environ.get("LOWBIT_EXT_VERBOSE", "") not in ("", "0"),
    )


QGEMM = JitExtension("lowbit_qgemm", [_CSRC / "qgemm.cpp"], "quantized kernels")
OPS = JitExtension("lowbit_ops", [_CSRC / "ops.cpp"], "fused decode ops")


def reset() -> None:
    """Forgets every extension's cached decision (LOWBIT_NO_EXT is read again)."""
    QGEMM.reset()
    OPS.reset()


def get() -> ModuleType | None:
    """The quantized-linear module (qgemm.cpp), or None when the torch fallback must be used."""
    return QGEMM.get()


def available() -> bool:
    """Whether the fast quantized-linear kernels will be used."""
    return QGEMM.get() is not None


def build_all() -> bool:
    """Builds both extensions now (setup calls this so the first generate does not wait for the
    compiler); returns whether both are usable. Failure is not fatal: the torch fallbacks work."""
    return all([QGEMM.get() is not None, OPS.get() is not None])


if __name__ == "__main__":
    import sys

    ok = build_all()
    print("lowbit: CPU kernels " + ("built" if ok else "unavailable; using the pure-torch fallbacks"), file=sys.stderr)
