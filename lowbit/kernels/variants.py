"""The instruction-set variants of the CPU kernels: one table read by both the build (setup.py) and
the run-time choice (registry.py), so the flags a variant is compiled with and the CPU flags it needs
can never disagree.

Stdlib only: setup.py loads this file by path, before torch or lowbit can be imported.

Each variant is one extension module, lowbit.kernels._cpu_<name>, built from every source under
csrc/ except the variant directories, plus its own csrc/<name>/*.cpp (none yet: a kernel written for
one instruction set alone goes there), all compiled with -DLOWBIT_ISA=<name> so its symbols and its
torch.ops namespace (lowbit_<name>) are its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

#: Flags the kernels were tuned and measured with; every variant adds its -m flags.
BASE_CFLAGS = ("-O3", "-fopenmp", "-std=c++17")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class Variant:
    """One build of the kernels for one instruction-set level."""

    name: str  # "avx2": LOWBIT_ISA value, module and namespace suffix
    march: tuple[str, ...]  # compiler -m flags
    cpu_flags: tuple[str, ...]  # every one must appear in /proc/cpuinfo's flags

    @property
    def impl(self) -> str:
        """The implementation name the registry reports, e.g. cpu-avx2."""
        return f"cpu-{self.name}"

    @property
    def module(self) -> str:
        return f"lowbit.kernels._cpu_{self.name}"

    @property
    def torch_namespace(self) -> str:
        return f"lowbit_{self.name}"

    @property
    def cflags(self) -> tuple[str, ...]:
        return (BASE_CFLAGS[0], *self.march, *BASE_CFLAGS[1:], f"-DLOWBIT_ISA={self.name}")


_AVX2 = ("-mavx2", "-mfma", "-mf16c")

AVX2 = Variant("avx2", _AVX2, ("avx2", "fma", "f16c"))
AVX512 = Variant(
    "avx512",
    (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16"),
    ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"),
)

#: Best first: the registry takes the first one the CPU supports and the install built.
VARIANTS: tuple[Variant, ...] = (AVX512, AVX2)

#: Names LOWBIT_ISA accepts: the variants plus the pure-torch reference.
ISA_CHOICES = (*(v.name for v in VARIANTS), "ref")


def by_name(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(name)


def source_files(csrc: Path) -> list[Path]:
    """Every kernel source and header under csrc/, in a fixed order."""
    return sorted(p for p in csrc.rglob("*") if p.suffix in (".cpp", ".h"))


def sources_hash(csrc: Path) -> str:
    """Hash of the kernel sources: compiled into each module, and compared with the sources at run
    time, so an editable checkout whose C++ changed after the build says so instead of running
    stale kernels."""
    h = hashlib.sha1()
    for p in source_files(csrc):
        h.update(p.relative_to(csrc).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def variant_sources(csrc: Path, variant: Variant) -> list[Path]:
    """The translation units of one variant: the shared ones plus csrc/<variant>/*.cpp."""
    own = {v.name for v in VARIANTS}
    shared = [p for p in source_files(csrc) if p.suffix == ".cpp" and p.relative_to(csrc).parts[0] not in own]
    return shared + sorted((csrc / variant.name).glob("*.cpp"))
