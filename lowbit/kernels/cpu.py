"""What the CPU can run: its model name and instruction-set flags, from /proc/cpuinfo.

Why /proc/cpuinfo: the kernel reports there the flags it has also enabled (AVX-512 state saving
included), under the names variants.py lists. Where the file is missing (not Linux) the flags come
from torch's own CPU capability probe, which can vouch for AVX2 but not for AVX-512 VNNI/BF16, so
such a machine never gets the AVX-512 build.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from .variants import AVX2, Variant

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    source: str  # where the flags were read, for `lowbit env`

    @classmethod
    def from_cpuinfo(cls, text: str, source: str = str(CPUINFO)) -> CpuInfo:
        """Parses /proc/cpuinfo text: the first processor's "model name" and "flags" lines."""
        model, flags = "", frozenset()
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
        return cls(model or platform.processor() or "unknown", flags, source)

    @classmethod
    def detect(cls, path: Path = CPUINFO) -> CpuInfo:
        try:
            return cls.from_cpuinfo(path.read_text(errors="replace"), str(path))
        except OSError:
            return cls._from_torch()

    @classmethod
    def _from_torch(cls) -> CpuInfo:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
        flags = frozenset(AVX2.cpu_flags) if capability.startswith(("AVX2", "AVX512")) else frozenset()
        return cls(platform.processor() or "unknown", flags, f"torch cpu capability {capability} (no {CPUINFO})")

    def missing(self, variant: Variant) -> tuple[str, ...]:
        """The CPU flags the variant needs that this CPU lacks (empty: it can run the variant)."""
        return tuple(f for f in variant.cpu_flags if f not in self.flags)

    def supports(self, variant: Variant) -> bool:
        return not self.missing(variant)
