"""The op registry: for each kernel op, one implementation per device and instruction set, chosen
once at first use, with the reason recorded.

Implementations: `cpu-avx512` and `cpu-avx2` (the extension modules setup.py built, see
variants.py), `ref` (pure torch, lowbit/kernels/ref.py or the caller's own torch path). Only CPU
tensors have compiled kernels so far; a GPU backend adds its `triton` implementations as candidates
ahead of these in Registry._resolve, with `ref` still the last resort.

The choice: the best variant the CPU can run (flags from /proc/cpuinfo, cpu.py) that the install
built and that imports. A variant the CPU cannot run is never imported: its module's static
initialisers could already execute instructions the CPU lacks. LOWBIT_ISA=avx2|avx512|ref forces a
choice and fails clearly if this machine cannot honour it; LOWBIT_NO_EXT=1 (the older switch) means
ref and wins over LOWBIT_ISA.

Why the hot path calls the pybind11 functions of the chosen module rather than torch.ops: the
dispatcher route costs more per call than many of these kernels take. Measured on the 2-core dev
machine (AMD EPYC, torch 2.13, 1 thread, inputs so small the kernel work is ~0, minimum of 25
interleaved runs of 1000 calls, three runs; the machine was not idle, so medians were 2-3x
higher for both): rms_norm 1.2 us direct vs 3.0-7.0 us through torch.ops.lowbit_avx2.rms_norm; the
quantized linear 2.1-3.8 us through the bound handle (QLinear.forward, one argument) vs 9.3-18.5 us
through torch.ops.lowbit_avx2.qlinear (eleven). A batch-1 decode step of the default model makes ~120
linear and ~150 fused-op calls in ~5 ms, so the dispatcher would add >= 1.1 ms (>20 %). The
dispatcher ops (the same C++ functions, bind/torch_ops.cpp) serve torch.compile and composing with
other torch code.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

from .cpu import CpuInfo
from .errors import KernelConfigError
from .variants import ISA_CHOICES, VARIANTS, Variant, by_name, sources_hash

CSRC = Path(__file__).parent / "csrc"
REF = "ref"


@dataclass(frozen=True)
class OpSpec:
    """One op: its name (the attribute of the compiled module), its family (the object callers get
    from `QGEMM.get()` / `OPS.get()`), and its torch reference: a function of lowbit.kernels.ref, or,
    where the reference lives with its data, a note saying where."""

    name: str
    family: str
    ref: str | None = None
    ref_elsewhere: str = ""


_LEAN = "the decoder's module path (lowbit/models/transformer.py)"
_ATTN = "gather + SDPA (lowbit/layers/paged_attention.py)"
_AMX = "none: the switch of the compiled bf16 GEMMs' AMX tile path (qgemm/amx.h); torch's matmul elsewhere"
OPS: tuple[OpSpec, ...] = (
    OpSpec("QLinear", "qgemm", ref_elsewhere="QuantLinear's dequantize + matmul (lowbit/layers/linear.py)"),
    OpSpec("dequantize", "qgemm", ref_elsewhere="QuantLinear._dequant_rows (lowbit/layers/linear.py)"),
    OpSpec("bf16_linear", "qgemm", "bf16_linear"),
    OpSpec("amx_bf16_active", "qgemm", ref_elsewhere=_AMX),
    OpSpec("set_amx_enabled", "qgemm", ref_elsewhere=_AMX),
    OpSpec("quantize_per_token", "int8", "quantize_per_token"),
    OpSpec("w8a8_linear", "int8", "w8a8_linear"),
    OpSpec("w4a8_linear", "int8", "w4a8_linear"),
    OpSpec("int8_mac_peak", "bench", ref_elsewhere="none: a peak of the machine (lowbit/bench/ceilings.py)"),
    OpSpec("rms_norm", "ops", "rms_norm"),
    OpSpec("fused_add_rms_norm", "ops", "fused_add_rms_norm"),
    OpSpec("silu_and_mul", "ops", "silu_and_mul"),
    OpSpec("rotary_", "ops", "rotary_"),
    OpSpec("rotary_and_cache", "ops", "rotary_and_cache"),
    OpSpec("rotary_qkv_", "ops", ref_elsewhere=_LEAN),
    OpSpec("rotary_and_cache_qkv", "ops", ref_elsewhere=_LEAN),
    OpSpec("quantize_to_pool", "ops", ref_elsewhere="kv_cache.quantize + index copies (lowbit/engine/kv_cache.py)"),
    OpSpec("paged_decode_attention", "ops", ref_elsewhere=_ATTN),
    OpSpec("shm_all_reduce", "ops", ref_elsewhere="the Python spin + torch.add path (lowbit/distributed/shm_allreduce.py)"),
    OpSpec("paged_decode_attention_qkv", "ops", ref_elsewhere=_ATTN),
)
FAMILIES = tuple(dict.fromkeys(op.family for op in OPS))


@dataclass(frozen=True)
class Choice:
    """What runs an op, and why."""

    op: str
    impl: str  # "cpu-avx512", "cpu-avx2" or "ref"
    reason: str
    library: str | None = None  # the .so file it runs from


@dataclass
class Build:
    """One variant on this machine: whether the CPU can run it, whether it was built, and (once
    tried) whether it loaded."""

    variant: Variant
    missing: tuple[str, ...]  # CPU flags it needs that this CPU lacks
    path: str | None  # the built module's file, found without loading it
    module: ModuleType | None = None
    error: str | None = None  # why it could not be used

    def why_not(self) -> str:
        if self.missing:
            return f"CPU lacks {' '.join(self.missing)}"
        if self.path is None:
            return f"not built (no {self.variant.module} module; the build at install failed or was skipped)"
        return self.error or ""


class OpSet:
    """One family's chosen compiled implementations, as attributes named like the op (the names
    of the former extension modules, so call sites read `ext.rms_norm(...)`)."""

    def __init__(self, family: str, impls: dict[str, Callable]) -> None:
        self.family = family
        self.__dict__.update(impls)

    def __repr__(self) -> str:
        return f"<lowbit kernels {self.family}: {', '.join(k for k in vars(self) if k != 'family')}>"


_UNSET = object()  # a family not resolved yet (None is a result: the torch reference)


class Family:
    """Accessor for one family, kept cheap because it sits on the per-token path: after the first
    call, get() is one attribute read and a comparison."""

    def __init__(self, registry: Registry, name: str) -> None:
        self.registry = registry
        self.name = name
        self._set: OpSet | None | object = _UNSET

    def get(self) -> OpSet | None:
        """The chosen compiled ops of this family, or None when they resolve to the torch reference."""
        s = self._set
        if s is _UNSET:
            s = self._set = self.registry.op_set(self.name)
        return s

    def available(self) -> bool:
        return self.get() is not None

    def forget(self) -> None:
        self._set = _UNSET


def find_library(module: str) -> str | None:
    """File of an extension module, without importing it (None if it was not built)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def load_variant(variant: Variant) -> ModuleType:
    """Imports a built variant (registering its torch.ops namespace) and its fake ops for
    torch.compile; warns if an editable checkout's C++ changed since it was built."""
    module = importlib.import_module(variant.module)
    if getattr(module, "torch_namespace", None) != variant.torch_namespace:
        raise ImportError(f"{variant.module} registers {getattr(module, 'torch_namespace', None)!r}, "
                          f"expected {variant.torch_namespace!r}")
    built_from = getattr(module, "sources_hash", "")
    if built_from and CSRC.is_dir() and built_from != sources_hash(CSRC):
        warnings.warn(
            f"lowbit: {module.__file__} was built from other kernel sources than {CSRC} (edited since the "
            "build?); rebuild with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=2,
        )
    from . import fake

    fake.register(variant.torch_namespace)
    return module


def env_choice(env: Mapping[str, str]) -> tuple[str | None, str]:
    """(forced implementation name or None for automatic, the setting that forced it)."""
    if env.get("LOWBIT_NO_EXT", "").strip() not in ("", "0"):
        return REF, f"LOWBIT_NO_EXT={env['LOWBIT_NO_EXT']}"
    isa = env.get("LOWBIT_ISA", "").strip().lower()
    if not isa:
        return None, ""
    if isa not in ISA_CHOICES:
        raise KernelConfigError(f"LOWBIT_ISA={env['LOWBIT_ISA']!r}: expected one of {', '.join(ISA_CHOICES)}")
    return isa, f"LOWBIT_ISA={isa}"


class Registry:
    """Resolves every op once (at the first get(), or after reset()), thread-safe.

    cpu, env, load and find default to this machine: /proc/cpuinfo, os.environ, load_variant and
    find_library; tests pass their own to fake a CPU or a build.
    """

    def __init__(
        self,
        cpu: CpuInfo | None = None,
        env: Mapping[str, str] | None = None,
        load: Callable[[Variant], ModuleType] = load_variant,
        find: Callable[[str], str | None] = find_library,
    ) -> None:
        self._cpu_given = cpu
        self._env = env
        self._load = load
        self._find = find
        self._lock = threading.RLock()
        self._families = {name: Family(self, name) for name in FAMILIES}
        self._cpu: CpuInfo | None = None
        self._builds: list[Build] | None = None
        self._choices: dict[str, Choice] | None = None

    # ---- public ---------------------------------------------------------------------------
    def family(self, name: str) -> Family:
        return self._families[name]

    def reset(self) -> None:
        """Forgets every choice: the environment and the CPU are read again at the next use."""
        with self._lock:
            self._cpu, self._builds, self._choices = None, None, None
            for f in self._families.values():
                f.forget()

    @property
    def cpu(self) -> CpuInfo:
        if self._cpu is None:
            self._cpu = self._cpu_given or CpuInfo.detect()
        return self._cpu

    def builds(self) -> list[Build]:
        """Every variant, best first, with what this machine can do with it (loads nothing)."""
        with self._lock:
            if self._builds is None:
                self._builds = [Build(v, self.cpu.missing(v), self._find(v.module)) for v in VARIANTS]
            return self._builds

    def choices(self) -> dict[str, Choice]:
        """Op name -> Choice, resolving (and loading the chosen variant) on first use."""
        choices = self._choices
        if choices is None:
            with self._lock:
                if self._choices is None:
                    self._choices = self._resolve()
                choices = self._choices
        return choices

    def choice(self, op: str) -> Choice:
        return self.choices()[op]

    def implementation(self, op: str) -> Callable | None:
        """The callable that runs `op`: the compiled function, the torch reference of ref.py, or
        None where the reference is the caller's own path (OpSpec.ref_elsewhere)."""
        c = self.choice(op)
        if c.impl != REF:
            return getattr(self._build(c.impl).module, op)
        spec = _spec(op)
        if spec.ref is None:
            return None
        from . import ref

        return getattr(ref, spec.ref)

    def op_set(self, family: str) -> OpSet | None:
        impls = {op.name: self.implementation(op.name) for op in OPS if op.family == family}
        if any(self.choice(name).impl == REF for name in impls):
            return None
        return OpSet(family, impls)

    # ---- resolution -----------------------------------------------------------------------
    def _resolve(self) -> dict[str, Choice]:
        env = os.environ if self._env is None else self._env
        forced, setting = env_choice(env)
        if forced == REF:
            return {op.name: self._ref_choice(op, setting) for op in OPS}
        if forced is not None:
            build = self._forced(by_name(forced), setting)
            return {op.name: Choice(op.name, build.variant.impl, setting, build.path) for op in OPS}
        skipped = []
        for build in self.builds():
            if build.missing or build.path is None or not self._try_load(build):
                skipped.append(f"{build.variant.name}: {build.why_not()}")
                continue
            reason = f"the best variant this CPU runs (it has {' '.join(build.variant.cpu_flags)})"
            if skipped:
                reason += "; skipped " + "; ".join(skipped)
            return {op.name: Choice(op.name, build.variant.impl, reason, build.path) for op in OPS}
        why = "no compiled variant usable: " + "; ".join(skipped)
        warnings.warn(f"lowbit: fast CPU kernels unavailable ({why}); using the slower pure-torch path.",
                      RuntimeWarning, stacklevel=4)
        return {op.name: self._ref_choice(op, why) for op in OPS}

    def _forced(self, variant: Variant, setting: str) -> Build:
        build = self._build(variant.impl)
        if build.missing:
            raise KernelConfigError(
                f"{setting}, but this CPU ({self.cpu.model}) lacks {' '.join(build.missing)} "
                f"(flags from {self.cpu.source}); unset LOWBIT_ISA to pick the best variant it runs"
            )
        if build.path is None or not self._try_load(build):
            raise KernelConfigError(f"{setting}, but the {variant.name} kernels cannot be used: {build.why_not()}")
        return build

    def _try_load(self, build: Build) -> bool:
        """Loads a variant the CPU supports (once); on failure records why. Every op must be there."""
        if build.module is None and build.error is None:
            try:
                module = self._load(build.variant)
                lacking = [op.name for op in OPS if not hasattr(module, op.name)]
                if lacking:
                    raise ImportError(f"{build.variant.module} lacks {', '.join(lacking)} (stale build?)")
                build.module = module
            except Exception as exc:  # noqa: BLE001 - a broken build must leave the torch path working
                lines = str(exc).strip().splitlines()
                build.error = f"failed to load: {type(exc).__name__}: {lines[-1] if lines else ''}"
        return build.module is not None

    def _build(self, impl: str) -> Build:
        return next(b for b in self.builds() if b.variant.impl == impl)

    @staticmethod
    def _ref_choice(op: OpSpec, why: str) -> Choice:
        where = f"lowbit.kernels.ref.{op.ref}" if op.ref else op.ref_elsewhere
        return Choice(op.name, REF, f"{why}; torch reference: {where}")


def _spec(op: str) -> OpSpec:
    return next(o for o in OPS if o.name == op)
