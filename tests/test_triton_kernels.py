"""The triton kernels against torch references (lowbit/kernels/triton/ref.py) and lowbit's own CPU
references (the KV pool's write and gather, lowbit/kernels/ref.py's RMSNorm, SiLU-and-mul, rotary),
on small shapes.

Without CUDA the kernels run on CPU tensors through triton's interpreter: TRITON_INTERPRET=1 is
set only while this module imports (reloads) the kernel modules, since triton reads it when
`@triton.jit` decorates, and is restored afterwards so no other test sees it. With CUDA the same
tests run compiled kernels on the GPU; tests marked `gpu` need CUDA and skip without it.
Interpreter caveat: its fp32 -> bf16 cast truncates (a GPU rounds to nearest even), so bf16
results are held to one bf16 step here and checked bit-exact only in the `gpu` tests.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
_KERNEL_MODULES = ("quant_gemm", "paged_attention", "kv_write", "elementwise", "sampling")

from lowbit.kernels import triton as tk  # noqa: E402  (imports no triton)

if not tk.triton_installed():
    pytest.skip("triton is not installed", allow_module_level=True)


@contextlib.contextmanager
def _interpreter_env():
    """TRITON_INTERPRET=1 (without CUDA) for the block, then back to what it was."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_testing():
    """triton imports some of its modules lazily at the first launch and decorates them then,
    so the variable must also be set while this module's tests run."""
    with _interpreter_env():
        yield


@pytest.fixture(autouse=True)
def _torch_path_cpu_pool(monkeypatch):
    """The CPU pool writes through its torch path here (the C++ one computes the same codes and
    has its own tests), so these tests never wait for the extension's build."""
    from lowbit import kernels

    monkeypatch.setattr(kernels.OPS, "get", lambda: None)


def _load_kernels():
    """Import (or reload) the kernel modules; without CUDA, under the interpreter. triton's own
    library (tl.zeros, ...) is decorated at `import triton`, so the variable must be set before
    the process first imports triton: here, unless something imported it earlier."""
    with _interpreter_env():
        try:
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError as e:  # installed but unusable (a wheel for another platform...)
            pytest.skip(f"triton does not import: {e}", allow_module_level=True)

        if not CUDA and not isinstance(tl.zeros, InterpretedFunction):
            pytest.skip("triton was imported before this module could switch its interpreter on; "
                        "run with TRITON_INTERPRET=1 or this file alone", allow_module_level=True)
        mods = []
        for name in _KERNEL_MODULES:
            full = f"lowbit.kernels.triton.{name}"
            mod = sys.modules.get(full)
            mods.append(importlib.reload(mod) if mod is not None else importlib.import_module(full))
        return mods


qg, pa, kw, ew, sm = _load_kernels()

from lowbit.engine.kv_cache import KVCachePool, KVCacheSpec  # noqa: E402
from lowbit.kernels.triton import layouts, ref  # noqa: E402
from lowbit.kernels import ref as cpu_ref  # noqa: E402
from lowbit.quant.formats import awq_gemm  # noqa: E402
from lowbit.layers.qweight import QuantizedWeight  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- registry hook
def test_triton_registry_lists_every_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.available()
    table = tk.ops()
    assert set(table) == set(tk.OP_NAMES) and all(callable(f) for f in table.values())
    assert table["paged_decode_attention"] is pa.paged_decode_attention


def test_triton_absent_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what an uninstalled package looks like
    assert not tk.triton_installed() and not tk.available()
    with pytest.raises(ImportError, match=r"lowbit\[gpu\]"):
        tk.ops()


def test_triton_import_lowbit_does_not_import_triton():
    code = "import sys, lowbit, lowbit.kernels.triton as t; t.available(); assert 'triton' not in sys.modules, 'imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # available() then stops at the cuda check, never importing triton
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------- weight layouts + GEMM
def _random_weight(bits: int, n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // gs, generator=g) * 0.05 + 0.005
    z = torch.randint(0, 2**bits, (n, k // gs), generator=g, dtype=torch.uint8)
    return q, s, z


def _packed(bits: int, q, s, z, group: int) -> layouts.PackedWeight:
    pw = layouts.pack_w8(q, s, z, group) if bits == 8 else layouts.pack_awq4(q, s, z, group)
    return layouts.PackedWeight(pw.bits, pw.qweight.to(DEV), pw.qzeros.to(DEV), pw.scales.to(DEV), pw.group_size)


@pytest.mark.parametrize("group", [32, 128, -1])
def test_triton_awq_layout_is_autoawq_gemm(group):
    q, s, z = _random_weight(4, 24, 256, group)
    gs = 256 if group == -1 else group
    ours = layouts.pack_awq4(q, s, z, group)
    theirs = awq_gemm.pack(QuantizedWeight(q, s, z, 4, gs))
    assert torch.equal(ours.qweight, theirs["qweight"]) and torch.equal(ours.qzeros, theirs["qzeros"])
    assert torch.equal(ours.scales, theirs["scales"])
    want = QuantizedWeight(q, s.half().float(), z, 4, gs).dequantize()
    assert torch.equal(ref.dequantize(ours).t(), want)
    assert torch.equal(ref.dequantize(layouts.pack_w8(q, s, z, group)).t(), want)


def _check_matmul(y: torch.Tensor, x: torch.Tensor, pw: layouts.PackedWeight, bias=None):
    want = ref.quant_matmul_ref(x, pw, bias).float()
    # fp16 activations, weights dequantized to fp16 for the tensor cores, fp32 accumulation
    tol = 2e-3 * want.abs().max().item() + 1e-3
    assert y.dtype == x.dtype and y.shape == want.shape
    assert (y.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize(
    "bits,group,k,n,m",
    [
        (4, 128, 256, 64, 1),  # decode GEMV, one group per K tile
        (4, 32, 128, 48, 1),
        (4, -1, 96, 64, 1),  # per channel, K not a power of two
        (3, 64, 128, 64, 3),  # 3-bit codes in the 4-bit container, tensor-core path
        (4, 64, 128, 64, 16),
        (4, 32, 128, 64, 40),
        (8, 64, 128, 64, 1),
        (8, 32, 128, 56, 20),
    ],
)
def test_triton_quant_matmul_matches_reference(bits, group, k, n, m):
    q, s, z = _random_weight(bits, n, k, group, seed=bits * 1000 + k + m)
    pw = _packed(bits if bits != 3 else 4, q, s, z, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(DEV)
    _check_matmul(qg.quant_matmul(x, pw), x, pw)


@pytest.mark.parametrize("config", [
    qg.GemmConfig(1, 64, 64, 2),  # GEMV: groups of 32 change inside the K tile
    qg.GemmConfig(16, 32, 64, 3),  # tensor cores, per-row groups, uneven split-K
    qg.GemmConfig(1, 32, 16, 1),  # GEMV without split
])
def test_triton_quant_matmul_configs(config):
    q, s, z = _random_weight(4, 64, 192, 32, seed=7)
    pw = _packed(4, q, s, z, 32)
    bias = torch.randn(64).half().to(DEV)
    x = torch.randn(2, 1 if config.block_m == 1 else 5, 192).half().to(DEV)
    y = qg.quant_matmul(x, pw, bias, config=config)
    assert y.shape == (2, x.shape[1], 64)
    _check_matmul(y, x, pw, bias)


def test_triton_awq_and_w8_entry_points_take_checkpoint_tensors():
    q, s, z = _random_weight(4, 32, 128, 64, seed=3)
    t = {k: v.to(DEV) for k, v in awq_gemm.pack(QuantizedWeight(q, s, z, 4, 64)).items()}
    x = torch.randn(1, 128).half().to(DEV)
    y = qg.awq_matmul(x, t["qweight"], t["qzeros"], t["scales"], 64)
    _check_matmul(y, x, layouts.from_awq(t["qweight"], t["qzeros"], t["scales"], 64))
    w8 = _packed(8, q, s, z, 64)
    assert torch.equal(qg.w8_matmul(x, w8.qweight, w8.qzeros, w8.scales, 64), qg.quant_matmul(x, w8))


def test_triton_quant_matmul_rejects_bad_input():
    q, s, z = _random_weight(4, 32, 128, 64)
    pw = _packed(4, q, s, z, 64)
    with pytest.raises(ValueError, match="fp16/bf16"):
        qg.quant_matmul(torch.randn(1, 128, device=DEV), pw)
    with pytest.raises(ValueError, match="expects 128"):
        qg.quant_matmul(torch.randn(1, 64, device=DEV).half(), pw)
    with pytest.raises(ValueError, match="qzeros has shape"):
        layouts.from_awq(pw.qweight, pw.qzeros[:1], pw.scales, 64)
    with pytest.raises(ValueError, match="does not divide"):
        layouts.pack_awq4(q, s, z, 48)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        layouts.pack_awq4(q + 16, s, z, 64)


# ----------------------------------------------------------------------------- KV write + attention
H_KV, HEAD_DIM, BS = 2, 16, 4


def _fill(pool: KVCachePool, tables, lens, seed: int = 0):
    """Write each sequence's keys/values through the CPU pool: sequence 0 one token at a time
    (int4 K blocks are extended and remapped), the others in one write."""
    g = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lens):
        slots = torch.tensor([int(tables[b][p // BS]) * BS + p % BS for p in range(n)])
        parts = [slots[i : i + 1] for i in range(n)] if b == 0 else [slots]
        for s in parts:
            scale = torch.linspace(0.2, 4.0, HEAD_DIM)  # channel spread, as real keys have
            pool.write(0, s, torch.randn(s.numel(), H_KV, HEAD_DIM, generator=g) * scale,
                       torch.randn(s.numel(), H_KV, HEAD_DIM, generator=g))


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("window,splits", [(0, None), (5, 2)])
def test_triton_paged_decode_attention_reads_the_cpu_pool(kv_dtype, window, splits):
    pool = KVCachePool(KVCacheSpec(1, H_KV, HEAD_DIM, BS, kv_dtype), 10)
    tables = torch.tensor([[3, 5, 0, 0], [7, 0, 0, 0], [1, 2, 4, 6]], dtype=torch.int32)
    lens = [7, 1, 13]
    _fill(pool, tables.tolist(), lens)
    q = torch.randn(3, 3 * H_KV, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    sz = (pool.k_sz[0], pool.v_sz[0]) if pool.spec.quantized else (None, None)
    scale = HEAD_DIM**-0.5
    want = ref.paged_decode_attention_ref(q, pool.k[0], pool.v[0], tables, torch.tensor(lens), scale, window,
                                          *sz, kv_dtype=kv_dtype)
    for b, n in enumerate(lens):  # the reference is the CPU pool's own gather + softmax attention
        k, v = pool.gather(0, tables[b, : (n + BS - 1) // BS].long())
        lo = max(0, n - window) if window else 0
        k, v = k[lo:n].repeat_interleave(3, 1), v[lo:n].repeat_interleave(3, 1)
        w = torch.einsum("hd,nhd->hn", q[b], k).mul(scale).softmax(-1)
        torch.testing.assert_close(want[b], torch.einsum("hn,nhd->hd", w, v), rtol=1e-5, atol=1e-5)
    dev = [t.to(DEV) if t is not None else None for t in (q, pool.k[0], pool.v[0], tables, *sz)]
    got = pa.paged_decode_attention(dev[0], dev[1], dev[2], dev[3], torch.tensor(lens, dtype=torch.int32, device=DEV),
                                    scale, window, dev[4], dev[5], kv_dtype=kv_dtype, splits=splits)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_triton_paged_decode_attention_half_pool(q_dtype):
    pool = KVCachePool(KVCacheSpec(1, H_KV, HEAD_DIM, BS, "fp32"), 6)
    tables = torch.tensor([[2, 4, 1], [5, 0, 0]], dtype=torch.int32)
    lens = [10, 3]
    _fill(pool, tables.tolist(), lens, seed=4)
    kv = "fp16" if q_dtype == torch.float16 else "bf16"
    k, v = pool.k[0].to(q_dtype).to(DEV), pool.v[0].to(q_dtype).to(DEV)
    q = torch.randn(2, 4 * H_KV, HEAD_DIM).to(q_dtype).to(DEV)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    got = pa.paged_decode_attention(q, k, v, tables.to(DEV), lens_t, 0.25, kv_dtype=kv)
    want = ref.paged_decode_attention_ref(q, k, v, tables.to(DEV), lens_t, 0.25, kv_dtype=kv)
    assert got.dtype == q_dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8", "int4"])
def test_triton_kv_write_is_bit_identical_to_the_cpu_pool(kv_dtype):
    """Same fp32 inputs -> the same codes and scales as KVCachePool.write, through block starts,
    single-token extensions (int4 K ranges widened and earlier rows remapped) and multi-block runs."""
    spec = KVCacheSpec(1, H_KV, HEAD_DIM, BS, kv_dtype)
    cpu, gpu_pool = KVCachePool(spec, 8), KVCachePool(spec, 8)
    dev = [t.to(DEV) for t in (*gpu_pool.k, *gpu_pool.v, *gpu_pool.k_sz, *gpu_pool.v_sz)]
    g = torch.Generator().manual_seed(5)
    steps = [[0, 1, 2, 3, 4, 5], [6, 12], [7, 13], [20, 21, 22, 23, 24, 25, 26], [14, 15, 16], [8]]
    for slots in steps:
        n = len(slots)
        k = torch.randn(n, H_KV, HEAD_DIM, generator=g) * torch.linspace(0.1, 6.0, HEAD_DIM)
        v = torch.randn(n, H_KV, HEAD_DIM, generator=g)
        cpu.write(0, torch.tensor(slots), k, v)
        one = n == len({s // BS for s in slots}) and n <= 2
        kw.write_kv(k.to(DEV), v.to(DEV), torch.tensor(slots, device=DEV), dev[0], dev[1],
                    dev[2] if spec.quantized else None, dev[3] if spec.quantized else None,
                    kv_dtype=kv_dtype, one_token_per_block=one)
    want = (*cpu.k, *cpu.v, *cpu.k_sz, *cpu.v_sz)
    for w, got in zip(want, dev):
        assert torch.equal(w, got.cpu())


def test_triton_kv_write_half_pool_and_bad_runs():
    k_pool = torch.zeros(4, BS, H_KV, HEAD_DIM, dtype=torch.float16, device=DEV)
    v_pool = torch.zeros_like(k_pool)
    k, v = torch.randn(3, H_KV, HEAD_DIM, device=DEV), torch.randn(3, H_KV, HEAD_DIM, device=DEV)
    kw.write_kv(k, v, torch.tensor([1, 2, 9], device=DEV), k_pool, v_pool, kv_dtype="fp16")
    assert torch.equal(k_pool.view(-1, H_KV, HEAD_DIM)[[1, 2, 9]], k.half())
    assert torch.equal(v_pool.view(-1, H_KV, HEAD_DIM)[[1, 2, 9]], v.half())
    pool = KVCachePool(KVCacheSpec(1, H_KV, HEAD_DIM, BS, "int4"), 4)
    args = [t.to(DEV) for t in (pool.k[0], pool.v[0], pool.k_sz[0], pool.v_sz[0])]
    with pytest.raises(ValueError, match="consecutive"):  # block 0 twice, not as one run
        kw.write_kv(k, v, torch.tensor([0, 5, 1], device=DEV), *args, kv_dtype="int4")
    codes = torch.zeros(4, BS, H_KV, HEAD_DIM, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="needs k_sz"):
        kw.write_kv(k, v, torch.tensor([0, 1, 2], device=DEV), codes, codes.clone(), kv_dtype="int8")


# ----------------------------------------------------------------------------- elementwise
def _close_or_bf16_step(got: torch.Tensor, want: torch.Tensor, exact: bool):
    if exact:
        assert torch.equal(got, want)
    else:  # interpreter bf16 casts truncate: one bf16 step of the value
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # bf16: two casts, each one step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_norms_and_silu_match_the_cpu_ops(dtype):
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(5, 48, generator=g).to(dtype), torch.randn(5, 48, generator=g).to(dtype)
    w = torch.randn(48, generator=g).to(dtype)
    close = dict(rtol=_RTOL[dtype], atol=1e-5)
    got = ew.rms_norm(x.to(DEV), w.to(DEV), 1e-6).cpu()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), cpu_ref.rms_norm(x, w, 1e-6).float(), **close)
    r_dev = r.to(DEV, copy=True)  # updated in place: never the CPU original
    got = ew.fused_add_rms_norm(x.to(DEV), r_dev, w.to(DEV), 1e-6).cpu()
    r_want = r + x
    _close_or_bf16_step(r_dev.cpu(), r_want, exact=dtype != torch.bfloat16 or CUDA)
    torch.testing.assert_close(got.float(), cpu_ref.rms_norm(r_want, w, 1e-6).float(), **close)
    gu = torch.randn(3, 2, 40, generator=g).to(dtype)
    got = ew.silu_and_mul(gu.to(DEV)).cpu()
    assert got.shape == (3, 2, 20)
    torch.testing.assert_close(got.float(), cpu_ref.silu_and_mul(gu).float(), **close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_rotary_matches_rotate_ref(dtype):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 6, 16, generator=g).to(dtype), torch.randn(4, 2, 16, generator=g).to(dtype)
    pos, cos_sin = torch.tensor([0, 5, 3, 9]), torch.randn(12, 16, generator=g)
    cos, sin = cos_sin[pos].unsqueeze(-2).chunk(2, dim=-1)
    qd, kd = q.to(DEV, copy=True), k.to(DEV, copy=True)  # rotated in place
    ew.rotary_(qd, kd, pos.to(DEV), cos_sin.to(DEV))
    exact = dtype != torch.bfloat16 or CUDA
    _close_or_bf16_step(qd.cpu(), cpu_ref.rotate(q, cos, sin), exact)
    _close_or_bf16_step(kd.cpu(), cpu_ref.rotate(k, cos, sin), exact)


# ----------------------------------------------------------------------------- sampling
def test_triton_greedy_follows_the_cpu_tie_rules():
    x = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0))
    x[1, 7] = x[1, 2900] = 50.0  # a tie across chunks: the first wins
    x[2, 40] = float("nan")
    x[3] = float("-inf")
    x[4, 4095 % 3000] = 60.0
    got = sm.greedy(x.to(DEV)).cpu()
    assert got.tolist() == x.max(dim=-1).indices.tolist() == ref.greedy_ref(x).tolist()
    assert got[1] == 7 and got[2] == 40 and got[3] == 0


def test_triton_sample_is_seeded_and_follows_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    B = 40  # one draw a row (the interpreter is slow); fixed Philox keys make the counts fixed
    seeds = sm.step_seeds(torch.full((B,), 11), torch.arange(B)).to(DEV)
    probs = p.expand(B, 4).contiguous().to(DEV)
    a = sm.sample(probs, seeds).cpu()
    assert torch.equal(sm.sample(probs[:6], seeds[:6]).cpu(), a[:6])  # same keys, same draws, any batch
    freq = torch.bincount(a, minlength=4).float() / B
    assert freq[3] == 0 and (freq[:3] - p[:3]).abs().max() < 0.2  # 40 draws: a sanity check; the gpu test counts 2**20
    other = sm.sample(probs[:6], sm.step_seeds(torch.full((6,), 12), torch.arange(6)).to(DEV)).cpu()
    assert not torch.equal(a[:6], other)


# ----------------------------------------------------------------------------- benchmark script
def test_triton_gpu_bench_smoke():
    env = dict(os.environ)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for tag in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        assert tag in r.stdout
    assert "max rel err" in r.stdout


# ----------------------------------------------------------------------------- CUDA only
@gpu
@needs_cuda
def test_triton_gpu_bf16_casts_round_like_torch():
    x = torch.randn(64, 256, device="cuda").bfloat16()
    r = torch.randn(64, 256, device="cuda").bfloat16()
    w = torch.randn(256, device="cuda").bfloat16()
    r2 = r.clone()
    ew.fused_add_rms_norm(x, r2, w, 1e-6)
    assert torch.equal(r2, r + x)
    q, k = torch.randn(8, 4, 64, device="cuda").bfloat16(), torch.randn(8, 2, 64, device="cuda").bfloat16()
    pos, cs = torch.arange(8, device="cuda"), torch.randn(16, 64, device="cuda")
    cos, sin = cs[pos].unsqueeze(-2).chunk(2, dim=-1)
    want_q = cpu_ref.rotate(q, cos, sin)
    ew.rotary_(q, k, pos, cs)
    assert torch.equal(q, want_q)


@gpu
@needs_cuda
def test_triton_gpu_sample_frequencies():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], device="cuda")
    B = 2**20
    seeds = sm.step_seeds(torch.full((B,), 3, device="cuda"), torch.arange(B, device="cuda"))
    freq = torch.bincount(sm.sample(p.expand(B, 5).contiguous(), seeds), minlength=5).float() / B
    assert freq[4] == 0 and (freq - p).abs().max() < 3e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_triton_gpu_llama_shapes(k, n, m):
    q, s, z = _random_weight(4, n, k, 128, seed=k + n)
    pw = _packed(4, q, s, z, 128)
    x = torch.randn(m, k, device="cuda").half()
    _check_matmul(qg.quant_matmul(x, pw), x, pw)


@gpu
@needs_cuda
def test_triton_gpu_decode_step_captures_in_a_cuda_graph():
    """The KV write (one token per block) and decode attention are graph-capturable: no host
    syncs, split count from shapes only."""
    spec = KVCacheSpec(1, 8, 128, 16, "int4")
    pool = KVCachePool(spec, 64)
    kp, vp, ksz, vsz = (t.cuda() for t in (pool.k[0], pool.v[0], pool.k_sz[0], pool.v_sz[0]))
    B = 4
    tables = torch.arange(B * 8, device="cuda", dtype=torch.int32).view(B, 8)
    lens = torch.full((B,), 100, dtype=torch.int32, device="cuda")
    slots = (tables[:, 6].long() * 16 + 3).contiguous()
    k, v, q = torch.randn(B, 8, 128, device="cuda"), torch.randn(B, 8, 128, device="cuda"), torch.randn(B, 32, 128, device="cuda").half()
    for p in range(99):  # prefix
        s = tables[:, p // 16].long() * 16 + p % 16
        kw.write_kv(torch.randn_like(k), torch.randn_like(v), s, kp, vp, ksz, vsz, "int4", one_token_per_block=True)

    def step():
        kw.write_kv(k, v, slots, kp, vp, ksz, vsz, "int4", one_token_per_block=True)
        return pa.paged_decode_attention(q, kp, vp, tables, lens, 128**-0.5, 0, ksz, vsz, "int4")

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    want = ref.paged_decode_attention_ref(q, kp, vp, tables, lens, 128**-0.5, 0, ksz, vsz, "int4")
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)
