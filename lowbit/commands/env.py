"""`lowbit env`: what this machine runs and why: CPU, torch, threads, the kernel builds and each
op's chosen implementation (the first thing to ask for in a performance report)."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print the CPU, torch, threads and the kernel chosen for each op, and why")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(report())
    return 0


def report() -> str:
    """The report as text (a function so tests can read it without a subprocess)."""
    import torch

    from .. import kernels
    from ..kernels.variants import VARIANTS

    reg = kernels.REGISTRY
    cpu = reg.cpu
    relevant = list(dict.fromkeys(f for v in VARIANTS for f in v.cpu_flags))
    lines = [
        f"cpu:       {cpu.model}",
        f"cpu flags: {' '.join(f if f in cpu.flags else f'-{f}' for f in relevant)}"
        f"  ('-' = missing; from {cpu.source})",
        f"torch:     {torch.__version__}",
        f"threads:   {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op "
        f"({os.cpu_count()} logical CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"LOWBIT_ISA={os.environ.get('LOWBIT_ISA', '') or 'unset'}  "
        f"LOWBIT_NO_EXT={os.environ.get('LOWBIT_NO_EXT', '') or 'unset'}",
        "kernel builds:",
    ]
    try:
        choices = kernels.choices()
        error = None
    except kernels.KernelConfigError as exc:
        choices, error = {}, str(exc)
    for b in reg.builds():
        state = "loaded" if b.module is not None else (b.why_not() or "built, not loaded")
        lines.append(f"  {b.variant.impl:<11} {b.path or '-'}  [{state}]")
    lines.append("ops:")
    if error is not None:
        lines.append(f"  error: {error}")
    width = max(len(name) for name in choices) if choices else 0
    for name, c in choices.items():
        lines.append(f"  {name:<{width}}  {c.impl:<11} {c.reason}")
    lines.append(f"dtype auto: {_auto_dtype(cpu.flags)}")
    return "\n".join(lines)


def _auto_dtype(flags: frozenset[str]) -> str:
    """What the engine's --dtype auto runs here, and why."""
    from .. import kernels
    from ..engine.args import resolve_dtype
    from ..errors import LowbitError

    forced = os.environ.get("LOWBIT_DTYPE", "")
    try:
        chosen = resolve_dtype("auto")
    except LowbitError as exc:
        return f"error: {exc}"
    if forced:
        return f"{chosen} (LOWBIT_DTYPE={forced})"
    native = [f for f in kernels.BF16_FLAGS if f in flags]
    if chosen == "bfloat16":
        return f"bfloat16 matrix work, fp32 accumulation (native bf16: {' '.join(native)})"
    why = "no compiled kernels" if native else f"no native bf16 ({' or '.join(kernels.BF16_FLAGS)})"
    return f"float32 ({why})"
