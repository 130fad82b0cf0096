"""Fused decode ops (lowbit/layers/ops.py + lowbit/kernels/csrc): each against its torch reference,
on every compiled kernel variant this machine runs and on the pure-torch reference, plus the paged
decode kernel against an explicit float64 softmax over the blocks every sequence owns."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit import kernels
from lowbit.engine import executor
from lowbit.engine.kv_cache import KVCachePool, KVCacheSpec
from lowbit.engine.paged_attention import SeqSlice, build_paged_context
from lowbit.layers import ops
from lowbit.layers.rotary import RopeConfig, RotaryEmbedding
from lowbit.quant.loader import load_model

from conftest import make_tiny_model, use_kernels


@pytest.fixture
def mode(kernel_impl):
    """Runs a test on each compiled variant and again on the pure-torch reference."""
    assert (kernels.OPS.get() is None) == (kernel_impl == "ref")
    return kernel_impl


@pytest.fixture
def ext(isa):
    """The compiled ops of one variant (a test per variant this machine runs)."""
    return kernels.OPS.get()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-6) -> None:
    a, b = a.double(), b.double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    assert a.shape == b.shape and err <= tol * scale, f"max abs err {err} (scale {scale})"


# ----------------------------------------------------------------------------- norms, activation
@pytest.mark.parametrize("shape", [(1, 576), (64, 576), (3, 5, 64), (7, 100), (2, 13)])
def test_rms_norm_matches_reference(mode, shape):
    x = torch.randn(*shape, generator=gen(1)) * 3
    w = torch.randn(shape[-1], generator=gen(2))
    before = x.clone()
    close(ops.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x.double(), w.double(), 1e-5))
    assert torch.equal(x, before)


def test_rms_norm_reads_strided_rows(mode):
    qkv = torch.randn(4, 3 * 64, generator=gen(3))
    q = qkv[:, :128].view(4, 2, 64)  # per-head norm (qwen3 q_norm) on a view of a fused projection
    w = torch.randn(64, generator=gen(4))
    close(ops.rms_norm(q, w, 1e-6), ops.rms_norm_ref(q.double(), w.double(), 1e-6))


@pytest.mark.parametrize("rows", [1, 64])
def test_fused_add_rms_norm_updates_residual_in_place(mode, rows):
    x = torch.randn(rows, 576, generator=gen(5))
    residual = torch.randn(rows, 576, generator=gen(6))
    w = torch.randn(576, generator=gen(7))
    want_sum = residual + x
    x_before = x.clone()
    out = ops.fused_add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(residual, want_sum)  # the add is exact, the same single rounding as torch
    assert torch.equal(x, x_before)
    close(out, ops.rms_norm_ref(want_sum.double(), w.double(), 1e-5))


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (64, 2 * 100), (2, 3, 2 * 8), (5, 2 * 3)])
def test_silu_and_mul_matches_reference(mode, shape):
    x = torch.randn(*shape, generator=gen(8)) * 4
    x.view(-1)[:4] = torch.tensor([-100.0, 100.0, -20.0, 0.0])  # exp range clamps, exact zero
    gate, up = x.double().chunk(2, dim=-1)
    close(ops.silu_and_mul(x), torch.nn.functional.silu(gate) * up)


def test_silu_and_mul_reads_a_row_strided_view(mode):
    big = torch.randn(6, 64, generator=gen(9))
    x = big[:, :32]  # rows strided by 64
    gate, up = x.double().chunk(2, dim=-1)
    close(ops.silu_and_mul(x), torch.nn.functional.silu(gate) * up)


# ----------------------------------------------------------------------------- rotary + KV write
def rotary_table(D: int, n: int = 512) -> RotaryEmbedding:
    return RotaryEmbedding(D, n, RopeConfig(theta=10000.0))


@pytest.mark.parametrize("D,Hq,Hkv", [(64, 9, 3), (128, 4, 1), (64, 4, 4)])
def test_rotary_in_place_matches_reference(mode, D, Hq, Hkv):
    N = 7
    rot = rotary_table(D)
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, generator=gen(10))
    q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.view(N, Hq, D), k.view(N, Hkv, D)  # strided views into the fused projection
    positions = torch.tensor([0, 1, 5, 100, 511, 3, 3])
    want_q, want_k = rot(positions, q.clone(), k.clone())
    rot.apply_(positions, q, k)
    close(q, want_q)
    close(k, want_k)


def test_rotary_in_place_on_batched_4d_inputs(mode):
    rot = rotary_table(64)
    q = torch.randn(2, 5, 3, 64, generator=gen(11))
    k = torch.randn(2, 5, 1, 64, generator=gen(12))
    positions = torch.arange(5).expand(2, 5) + torch.tensor([[0], [40]])
    want_q, want_k = rot(positions, q, k)
    ops.rotary_(q, k, positions, rot.cos_sin)
    close(q, want_q)
    close(k, want_k)


@pytest.mark.parametrize("D", [64, 128])
def test_rotary_and_cache_writes_rotated_k_and_v_at_slots(mode, D):
    N, Hq, Hkv, blocks, bs = 5, 6, 2, 4, 16
    rot = rotary_table(D)
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, generator=gen(13))
    q, k, v = (t.view(N, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
    positions = torch.tensor([3, 17, 18, 40, 2])
    slots = torch.tensor([5, 33, 34, 60, 0])
    want_q, want_k = rot(positions, q.clone(), k.clone())
    want_v = v.clone()
    k_pool = torch.zeros(blocks, bs, Hkv, D)
    v_pool = torch.zeros(blocks, bs, Hkv, D)
    ops.rotary_and_cache(q, k, v, positions, rot.cos_sin, slots, k_pool, v_pool)
    close(q, want_q)
    close(k, want_k)
    close(k_pool.view(-1, Hkv, D)[slots], want_k)
    assert torch.equal(v_pool.view(-1, Hkv, D)[slots], want_v)
    others = torch.ones(blocks * bs, dtype=torch.bool)
    others[slots] = False
    assert not k_pool.view(-1, Hkv, D)[others].any() and not v_pool.view(-1, Hkv, D)[others].any()


def test_rotary_and_cache_rounds_into_a_bf16_pool_as_torch_does(mode):
    """A bf16 pool (kv_cache_dtype bf16) gets the rotated k and v rounded to nearest even: bit for
    bit torch's .to(bfloat16), infinities and ties included."""
    N, Hq, Hkv, D, blocks, bs = 4, 4, 2, 64, 2, 16
    rot = rotary_table(D)
    q, k, v = torch.randn(N, Hq, D, generator=gen(3)), torch.randn(N, Hkv, D, generator=gen(4)), \
        torch.randn(N, Hkv, D, generator=gen(5)) * 1e3
    v[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38])
    v[1, 0, :3] = torch.tensor([1.00390625, 1.01171875, -1.00390625])  # ties: round to even
    positions, slots = torch.tensor([0, 5, 9, 30]), torch.tensor([1, 2, 17, 31])
    want_q, want_k = rot(positions, q.clone(), k.clone())
    k_pool = torch.zeros(blocks, bs, Hkv, D, dtype=torch.bfloat16)
    v_pool = torch.zeros_like(k_pool)
    ops.rotary_and_cache(q, k, v, positions, rot.cos_sin, slots, k_pool, v_pool)
    close(q, want_q)
    close(k_pool.view(-1, Hkv, D)[slots].float(), want_k.to(torch.bfloat16).float(), tol=1e-2)
    assert torch.equal(k_pool.view(-1, Hkv, D)[slots].view(torch.int16), k.to(torch.bfloat16).view(torch.int16))
    got_v, want_v = v_pool.view(-1, Hkv, D)[slots], v.to(torch.bfloat16)
    assert torch.isnan(got_v[0, 0, 0])  # a NaN stays a NaN (its payload bits are not specified)
    got_v[0, 0, 0] = want_v[0, 0, 0] = 0
    assert torch.equal(got_v.view(torch.int16), want_v.view(torch.int16))


def test_rotary_rejects_positions_outside_the_table(ext):
    rot = rotary_table(64, n=8)
    q, k = torch.randn(1, 2, 64), torch.randn(1, 1, 64)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        ops.rotary_(q, k, torch.tensor([8]), rot.cos_sin)


# ----------------------------------------------------------------------------- paged decode attention
def fill_pool(pool: KVCachePool, tables: list[list[int]], lens: list[int], Hkv: int, D: int, seed: int) -> None:
    g = gen(seed)
    for table, n in zip(tables, lens):
        slots = torch.tensor([table[t // pool.block_size] * pool.block_size + t % pool.block_size for t in range(n)])
        pool.write(0, slots, torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g))


def reference_decode(pool, q, tables, lens, window):
    """float64 softmax(q k^T / sqrt(D)) v over each sequence's (dequantized) cached keys."""
    B, Hq, D = q.shape
    outs = []
    for b in range(B):
        blocks = torch.tensor(tables[b][: (lens[b] + pool.block_size - 1) // pool.block_size])
        k, v = pool.gather(0, blocks)
        start = max(0, lens[b] - window) if window else 0
        k, v = k[start : lens[b]].double(), v[start : lens[b]].double()  # [L, Hkv, D]
        G = Hq // k.shape[1]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), k) / math.sqrt(D)
        outs.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


def random_tables(B: int, lens: list[int], bs: int, num_blocks: int, seed: int) -> list[list[int]]:
    """Each sequence gets its own shuffled (non-contiguous) blocks."""
    perm = torch.randperm(num_blocks, generator=gen(seed)).tolist()
    tables, i = [], 0
    for n in lens:
        nb = (n + bs - 1) // bs
        tables.append(perm[i : i + nb])
        i += nb
    return tables


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("Hq,Hkv,D", [(3, 3, 64), (9, 3, 64), (8, 2, 128), (4, 1, 64)])
def test_paged_decode_attention_matches_reference(ext, kv_dtype, B, Hq, Hkv, D):
    bs = 16
    lens = torch.randint(1, 70, (B,), generator=gen(B + Hq)).tolist()
    lens[0] = 37  # never a multiple of the block size
    if B > 1:
        lens[1] = 1  # a sequence with only the new token
        lens[2] = 48  # exactly three blocks
    num_blocks = sum((n + bs - 1) // bs for n in lens) + 3
    pool = KVCachePool(KVCacheSpec(1, Hkv, D, bs, kv_dtype), num_blocks)
    if kv_dtype == "int4" and not getattr(pool.spec, "channel_keys", False):
        pytest.skip("the kernel reads int4 pools with per-channel keys (kv_cache.py's scheme)")
    tables = random_tables(B, lens, bs, num_blocks, seed=B)
    fill_pool(pool, tables, lens, Hkv, D, seed=D)
    max_nb = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (max_nb - len(t)) for t in tables], dtype=torch.int32)
    q_big = torch.randn(B, Hq + 2 * Hkv, D, generator=gen(20))
    q = q_big[:, :Hq]  # a strided view, as the decoder passes it
    for window in (0, 5):
        sz = (pool.k_sz[0], pool.v_sz[0]) if pool.spec.quantized else (None, None)
        got = ops.paged_decode_attention(q, pool.k[0], pool.v[0], bt, torch.tensor(lens, dtype=torch.int32),
                                         1 / math.sqrt(D), window, *sz, kv_dtype=kv_dtype)
        # int8 K: the kernel rounds q to int16 for exact integer dot products with the codes
        # (~1e-5 of |q| per element, ~100x below the int8 rounding of K itself)
        close(got, reference_decode(pool, q, tables, lens, window), tol=1e-4 if kv_dtype == "int8" else 1e-5)


def test_paged_decode_attention_rejects_blocks_outside_the_pool(ext):
    pool = KVCachePool(KVCacheSpec(1, 1, 64, 16, "fp32"), 2)
    q = torch.randn(1, 2, 64)
    bad = torch.tensor([[5]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.paged_decode_attention(q, pool.k[0], pool.v[0], bad, torch.tensor([3], dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        ops.paged_decode_attention(q, pool.k[0], pool.v[0], torch.tensor([[0]], dtype=torch.int32),
                                   torch.tensor([17], dtype=torch.int32), 0.125)


# ----------------------------------------------------------------------------- through the model
@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8"])
def test_engine_forward_same_with_and_without_the_extension(tmp_path, monkeypatch, isa, kv_dtype):
    """A mixed step (two decodes + a prefill chunk with a cached prefix) through the paged context:
    fused ops and the torch fallback give the same hidden states."""
    make_tiny_model("llama", tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, with_tokenizer=False).model
    model.fuse_projections()
    cfg = model.config

    def run(disabled: bool) -> list[torch.Tensor]:
        use_kernels(monkeypatch, "ref" if disabled else isa)
        pool = KVCachePool(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8, kv_dtype), 32)
        tables = [[3, 9, 1, 4], [7, 2], [5, 6, 8, 10]]
        prompts = [torch.randint(0, 256, (n,), generator=gen(30 + n)) for n in (27, 11, 20)]
        outs = []
        with torch.inference_mode():
            # prefill the first two sequences and the first 13 tokens of the third
            steps = [[(0, 0, 26), (1, 0, 10)], [(2, 0, 13)], [(0, 26, 1), (1, 10, 1), (2, 13, 7)]]
            for step in steps:
                items = [SeqSlice(tables[s], start, n) for s, start, n in step]
                ids = torch.cat([prompts[s][start : start + n] for s, start, n in step])
                ctx = build_paged_context(pool, items, cfg.sliding_window)
                outs.append(model(ids, ctx.positions, ctx))
        return outs

    # bf16: prefill SDPA runs on q, k, v rounded to bf16, so the two paths' fp32-level differences
    # (rotary's op order) can flip a rounding: agreement to bf16 level, not fp32
    for a, b in zip(run(False), run(True)):
        close(a, b, tol=5e-3 if kv_dtype == "bf16" else 1e-5)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8", "int4"])
def test_lean_decode_loop_equals_the_module_path(tmp_path, monkeypatch, isa, kv_dtype):
    """Pure decode steps skip nn.Module dispatch; the result must be bit-identical to the module
    path (forced here by a no-op hook, which the lean loop must notice)."""
    if kv_dtype == "int4" and not getattr(KVCacheSpec(1, 1, 16, 8, "int4"), "channel_keys", False):
        pytest.skip("the kernel reads int4 pools with per-channel keys (kv_cache.py's scheme)")
    make_tiny_model("qwen2", tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, with_tokenizer=False).model
    model.fuse_projections()
    cfg = model.config
    calls = []
    real_lean = executor.forward_lean
    monkeypatch.setattr(executor, "forward_lean", lambda *a: calls.append(1) or real_lean(*a))

    def run(hooked: bool) -> list[torch.Tensor]:
        handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None) if hooked else None
        pool = KVCachePool(KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8, kv_dtype), 16)
        tables = [[3, 9, 1], [7, 2, 0]]
        prompts = [torch.randint(0, 256, (n,), generator=gen(40 + n)) for n in (9, 14)]
        outs = []
        with torch.inference_mode():
            ctx = build_paged_context(pool, [SeqSlice(tables[0], 0, 9), SeqSlice(tables[1], 0, 14)])
            assert not ctx.lean  # a prefill step
            executor.execute(model, torch.cat(prompts), ctx.positions, ctx)
            lens = [9, 14]
            for step in range(4):
                items = [SeqSlice(t, n, 1) for t, n in zip(tables, lens)]
                ctx = build_paged_context(pool, items)
                assert ctx.lean
                ids = torch.tensor([(17 * step + i) % 256 for i in range(2)])
                outs.append(executor.execute(model, ids, ctx.positions, ctx))
                lens = [n + 1 for n in lens]
        if handle is not None:
            handle.remove()
        return outs

    lean = run(False)
    assert len(calls) == 4
    calls.clear()
    module_path = run(True)
    assert calls == []  # the hook sent every step down the module path
    for a, b in zip(lean, module_path):
        assert torch.equal(a, b)


def test_kernel_is_not_used_on_a_pool_scheme_it_does_not_know(monkeypatch, isa):
    """The decode path probes each quantized pool scheme once: if the pool's own dequantization
    disagrees with what the kernel assumes, the torch path is used instead of misreading it."""
    from lowbit.engine import paged_attention as pa
    from lowbit.layers import kv_quant

    monkeypatch.setattr(pa, "_LAYOUT_OK", {})
    assert pa._probe_layout("int8")
    real = kv_quant.dequantize
    monkeypatch.setattr(kv_quant, "dequantize", lambda q, sz, dtype: real(q, sz, dtype) * 1.5)  # "a new scheme"
    assert not pa._probe_layout("int8")
    pool = KVCachePool(KVCacheSpec(1, 2, 32, 4, "int8"), 4)
    assert not pa._kernel_reads(pool)
    ctx = build_paged_context(pool, [SeqSlice([0], 2, 1)])
    assert ctx.decode.tables is None and not ctx.lean  # decode falls back to gather + SDPA


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("D", [64, 12])
def test_quantized_pool_write_is_bit_identical_to_the_torch_scheme(ext, kv_dtype, D):
    """quantize_to_pool (the pool's fast write) stores exactly kv_quant.quantize's codes and
    (scale, zero), for strided rows, magnitudes from 1e-6 to 1e3 and a constant row."""
    from lowbit.layers.kv_quant import quantize

    N, H = 37, 3
    x = torch.randn(N, H + 4, D, generator=gen(5))[:, 2 : 2 + H]  # strided view, like k/v of a fused qkv
    x = x * 10 ** torch.empty(N, 1, 1).uniform_(-6, 3, generator=gen(6))
    x[0] = 1.5  # max == min: the scale floor
    q, sz = quantize(x, kv_dtype)
    rows = 100
    pool = torch.zeros(rows, H, q.shape[-1], dtype=torch.uint8)
    scale_zero = torch.zeros(rows, H, 2)
    slots = torch.randperm(rows, generator=gen(7))[:N]
    bits = 8 if kv_dtype == "int8" else 4
    ext.quantize_to_pool(x, slots, pool, scale_zero, bits)
    assert torch.equal(pool[slots], q)
    assert torch.equal(scale_zero[slots], sz)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[slots] = False
    assert not pool[untouched].any() and not scale_zero[untouched].any()
    with pytest.raises(RuntimeError, match="outside the KV pool"):
        ext.quantize_to_pool(x, torch.full((N,), rows, dtype=torch.long), pool, scale_zero, bits)


def test_prefill_attention_over_a_bf16_pool_runs_in_bf16():
    """A bf16 pool's prefill SDPA runs on bf16 q, k, v (lowbit/engine/paged_attention.py): the result
    is fp32, within bf16 rounding of the fp32 SDPA, and not bit-equal to it (it did round)."""
    from lowbit.engine import paged_attention as pa

    q, k, v = (torch.randn(2, 9 if i == 0 else 3, 40, 64, generator=gen(60 + i)) for i in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    low = pa._sdpa(q, k, v, torch.bfloat16, is_causal=True)
    assert low.dtype == torch.float32 and not torch.equal(low, exact)
    close(low, exact, tol=2e-2)
    assert torch.equal(pa._sdpa(q, k, v, None, is_causal=True), exact)
    pool = KVCachePool(KVCacheSpec(1, 3, 64, 16, "bf16"), 8)
    assert pa.build_paged_context(pool, [SeqSlice([0, 1, 2], 0, 40)])._sdpa_dtype == torch.bfloat16
    pool32 = KVCachePool(KVCacheSpec(1, 3, 64, 16, "fp32"), 8)
    assert pa.build_paged_context(pool32, [SeqSlice([0, 1, 2], 0, 40)])._sdpa_dtype is None
