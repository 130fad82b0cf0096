"""The kernel registry (lowbit/kernels): CPU detection from /proc/cpuinfo text, the choice of one
implementation per op with its reason, LOWBIT_ISA / LOWBIT_NO_EXT, the rule that a variant the CPU
cannot run is never loaded, the dispatcher ops, and `lowbit env`."""
from __future__ import annotations

import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import KernelConfigError, Registry, ref
from lowbit.kernels.cpu import CpuInfo
from lowbit.kernels.registry import OPS

ROOT = Path(__file__).resolve().parents[1]
BASE_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx"
AVX2_ONLY = f"{BASE_FLAGS} fma f16c avx2 bmi2"
AVX512 = f"{AVX2_ONLY} avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16"


def cpuinfo(flags: str, model: str = "Test CPU") -> str:
    """Two processors, as /proc/cpuinfo lists them."""
    one = f"processor\t: {{}}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    return one.format(0) + one.format(1)


class FakeBuilds:
    """Stands in for the installed modules: records every load, so a test can assert which
    variants were (never) imported."""

    def __init__(self, built=("avx2", "avx512"), broken=(), lacking=()) -> None:
        self.built, self.broken, self.lacking = set(built), set(broken), set(lacking)
        self.loaded: list[str] = []

    def find(self, module: str) -> str | None:
        name = module.rsplit("_", 1)[-1]
        return f"/fake/_cpu_{name}.so" if name in self.built else None

    def load(self, variant) -> types.ModuleType:
        self.loaded.append(variant.name)
        if variant.name in self.broken:
            raise ImportError(f"undefined symbol in {variant.module}")
        module = types.ModuleType(variant.module)
        for op in OPS:
            if op.name not in self.lacking:
                setattr(module, op.name, lambda *a, _v=variant.name, _op=op.name: (_v, _op))
        return module


def registry(flags: str, env: dict | None = None, builds: FakeBuilds | None = None) -> tuple[Registry, FakeBuilds]:
    builds = builds or FakeBuilds()
    reg = Registry(cpu=CpuInfo.from_cpuinfo(cpuinfo(flags)), env=env or {}, load=builds.load, find=builds.find)
    return reg, builds


def impls(reg: Registry) -> set[str]:
    return {c.impl for c in reg.choices().values()}


# ----------------------------------------------------------------------------- detection
def test_cpuinfo_parsing_reads_the_first_processor():
    info = CpuInfo.from_cpuinfo(cpuinfo(AVX512, model="Intel(R) Xeon(R) Platinum 8480+"))
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx512_vnni", "avx512_bf16", "avx2"} <= info.flags and "avx512vnni" not in info.flags
    assert info.supports(kernels.variants.AVX512) and info.supports(kernels.variants.AVX2)
    avx2 = CpuInfo.from_cpuinfo(cpuinfo(AVX2_ONLY))
    assert avx2.missing(kernels.variants.AVX512) == ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
    assert not avx2.missing(kernels.variants.AVX2)
    # AVX-512F alone (e.g. Skylake-SP: no VNNI, no BF16) is not enough for the avx512 build
    skx = CpuInfo.from_cpuinfo(cpuinfo(f"{AVX2_ONLY} avx512f avx512bw avx512vl avx512dq"))
    assert skx.missing(kernels.variants.AVX512) == ("avx512_vnni", "avx512_bf16")


# ----------------------------------------------------------------------------- the choice
def test_avx2_only_cpu_never_loads_the_avx512_variant():
    reg, builds = registry(AVX2_ONLY)  # LOWBIT_ISA unset, both variants built
    assert impls(reg) == {"cpu-avx2"}
    assert builds.loaded == ["avx2"]
    reason = reg.choice("rms_norm").reason
    assert "avx512: CPU lacks avx512f" in reason and "avx512_bf16" in reason
    assert reg.choice("QLinear").library == "/fake/_cpu_avx2.so"
    assert reg.family("ops").get().rms_norm() == ("avx2", "rms_norm")


def test_forcing_avx512_on_an_avx2_cpu_is_a_clear_error():
    reg, builds = registry(AVX2_ONLY, {"LOWBIT_ISA": "avx512"})
    with pytest.raises(KernelConfigError, match=r"LOWBIT_ISA=avx512, but this CPU \(Test CPU\) lacks avx512f .*avx512_bf16"):
        reg.choices()
    with pytest.raises(KernelConfigError):
        reg.family("qgemm").get()
    assert builds.loaded == []


def test_avx512_cpu_takes_avx512_and_lowbit_isa_can_force_avx2():
    reg, builds = registry(AVX512)
    assert impls(reg) == {"cpu-avx512"} and builds.loaded == ["avx512"]
    assert "avx512_vnni" in reg.choice("paged_decode_attention").reason
    reg, builds = registry(AVX512, {"LOWBIT_ISA": "AVX2"})
    assert impls(reg) == {"cpu-avx2"} and builds.loaded == ["avx2"]
    assert reg.choice("silu_and_mul").reason == "LOWBIT_ISA=avx2"


def test_lowbit_isa_ref_and_lowbit_no_ext_force_the_torch_reference():
    for env in ({"LOWBIT_ISA": "ref"}, {"LOWBIT_NO_EXT": "1"}, {"LOWBIT_NO_EXT": "1", "LOWBIT_ISA": "avx2"}):
        reg, builds = registry(AVX512, env)
        assert impls(reg) == {"ref"} and builds.loaded == []
        assert reg.family("ops").get() is None and reg.family("qgemm").get() is None
        assert reg.implementation("rms_norm") is ref.rms_norm
        assert reg.implementation("paged_decode_attention") is None  # the caller's gather + SDPA
        assert "paged_attention.py" in reg.choice("paged_decode_attention").reason
    reg, _ = registry(AVX512, {"LOWBIT_NO_EXT": "0"})
    assert impls(reg) == {"cpu-avx512"}


def test_unknown_lowbit_isa_value_lists_the_choices():
    reg, _ = registry(AVX512, {"LOWBIT_ISA": "sse2"})
    with pytest.raises(KernelConfigError, match="LOWBIT_ISA='sse2': expected one of avx512, avx2, ref"):
        reg.choices()


def test_missing_builds_fall_back_to_ref_with_one_warning():
    reg, builds = registry(AVX512, builds=FakeBuilds(built=()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reg.family("ops").get() is None
        assert reg.family("qgemm").get() is None
        reg.choices()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "not built" in str(caught[0].message)
    assert impls(reg) == {"ref"} and builds.loaded == []
    reg, _ = registry(AVX512, {"LOWBIT_ISA": "avx2"}, FakeBuilds(built=("avx512",)))
    with pytest.raises(KernelConfigError, match="avx2 kernels cannot be used: not built"):
        reg.choices()


def test_a_broken_or_incomplete_build_is_skipped_for_the_next_variant():
    reg, builds = registry(AVX512, builds=FakeBuilds(broken=("avx512",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a usable variant remains: no warning
        assert impls(reg) == {"cpu-avx2"}
    assert builds.loaded == ["avx512", "avx2"]
    assert "avx512: failed to load: ImportError: undefined symbol" in reg.choice("rms_norm").reason
    reg, _ = registry(AVX2_ONLY, builds=FakeBuilds(lacking=("quantize_to_pool",)))
    with pytest.warns(RuntimeWarning, match="lacks quantize_to_pool"):
        assert impls(reg) == {"ref"}


def test_reset_reads_the_environment_again():
    env = {"LOWBIT_ISA": "ref"}
    reg, _ = registry(AVX2_ONLY, env)
    ops = reg.family("ops")
    assert ops.get() is None
    env["LOWBIT_ISA"] = "avx2"
    assert ops.get() is None  # chosen once: the per-token path never re-reads the environment
    reg.reset()
    assert ops.get() is not None and ops.available()


# ----------------------------------------------------------------------------- this machine
def test_this_machine_loads_only_variants_its_cpu_runs():
    """A fresh interpreter picks a variant and runs a kernel; a variant the CPU lacks stays unimported."""
    code = (
        "import sys, torch\n"
        "from lowbit import kernels\n"
        "from lowbit.layers import ops\n"
        "ops.rms_norm(torch.ones(1, 8), torch.ones(8), 1e-6)\n"
        "print(sorted(m for m in sys.modules if m.startswith('lowbit.kernels._cpu_')))\n"
        "print(sorted(b.variant.name for b in kernels.REGISTRY.builds() if b.missing))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LOWBIT_ISA", "LOWBIT_NO_EXT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, unsupported = (eval(line) for line in out.stdout.strip().splitlines()[-2:])
    assert not {f"lowbit.kernels._cpu_{name}" for name in unsupported} & set(loaded)
    if kernels.usable_variants():
        assert loaded == [f"lowbit.kernels._cpu_{kernels.usable_variants()[0]}"]


def test_no_module_compiles_at_run_time():
    """Kernels are built by setup.py at install; nothing in the package may build them at first use."""
    offenders = [p for p in (ROOT / "lowbit").rglob("*.py") if "cpp_extension" in p.read_text()]
    assert offenders == []


def test_env_command_reports_every_choice(capsys, monkeypatch):
    from lowbit.cli import main

    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    monkeypatch.delenv("LOWBIT_NO_EXT", raising=False)
    kernels.reset()
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch:     {torch.__version__}" in out and kernels.REGISTRY.cpu.model in out
    assert "avx512_bf16" in out and "threads:" in out
    for op in OPS:
        assert f"  {op.name} " in out
    for b in kernels.REGISTRY.builds():
        assert b.variant.impl in out
        if b.path:
            assert b.path in out
    chosen = kernels.choices()["rms_norm"]
    assert f"{chosen.impl:<11} {chosen.reason}" in out
    monkeypatch.setenv("LOWBIT_ISA", "nonsense")
    kernels.reset()
    assert main(["env"]) == 0
    assert "error: LOWBIT_ISA='nonsense'" in capsys.readouterr().out
    monkeypatch.undo()
    kernels.reset()


# ----------------------------------------------------------------------------- the dispatcher ops
def test_dispatcher_ops_equal_the_direct_bindings(isa):
    """torch.ops.lowbit_<isa>.* run the same C++ functions as the hot path's direct bindings."""
    from lowbit.layers.linear import QuantLinear
    from lowbit.layers.qweight import QuantizedWeight

    ns = getattr(torch.ops, f"lowbit_{isa}")
    ext = kernels.OPS.get()
    x, w = torch.randn(3, 576), torch.randn(576)
    assert torch.equal(ns.rms_norm(x, w, 1e-5), ext.rms_norm(x, w, 1e-5))
    r1, r2 = torch.randn(3, 576), None
    r2 = r1.clone()
    assert torch.equal(ns.fused_add_rms_norm(x, r1, w, 1e-5), ext.fused_add_rms_norm(x, r2, w, 1e-5))
    assert torch.equal(r1, r2)
    g = torch.Generator().manual_seed(0)
    qw = QuantizedWeight(torch.randint(0, 16, (40, 256), dtype=torch.uint8, generator=g), torch.rand(40, 4) * 0.01,
                         torch.randint(0, 16, (40, 4), dtype=torch.uint8, generator=g), 4, 64, False)
    layer = QuantLinear.from_quantized(qw, torch.randn(40))
    x = torch.randn(2, 256)
    got = ns.qlinear(x, layer.packed, layer.scales, layer.offset, layer.bias, layer.container_bits,
                     layer.in_features, layer.k8, layer.kernel_group, 64, 0)
    assert torch.equal(got, layer(x))
    assert torch.equal(ns.dequantize(layer.packed, layer.scales, layer.offset, layer.container_bits, layer.k8,
                                     layer.kernel_group), kernels.get().dequantize(
        layer.packed, layer.scales, layer.offset, layer.container_bits, layer.k8, layer.kernel_group))


def test_dispatcher_ops_trace_under_torch_compile(isa):
    """The schemas (what each op mutates) and fake implementations let torch.compile trace them."""
    ns = getattr(torch.ops, f"lowbit_{isa}")

    def block(x, residual, w, gate_up):
        h = ns.fused_add_rms_norm(x, residual, w, 1e-6)
        return ns.rms_norm(h, w, 1e-6), ns.silu_and_mul(gate_up)

    x, w, gu = torch.randn(4, 64), torch.randn(64), torch.randn(4, 256)
    r_eager, r_compiled = torch.randn(4, 64), None
    r_compiled = r_eager.clone()
    want = block(x, r_eager, w, gu)
    torch._dynamo.reset()
    got = torch.compile(block, backend="aot_eager", fullgraph=True)(x, r_compiled, w, gu)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(r_compiled, r_eager)  # the in-place residual update survived functionalization
