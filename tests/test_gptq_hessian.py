"""GPTQ's Hessians of a decoder layer: v_proj's attention-weighted Hessian per kv head equals the
brute-force sum of (A_j X)^T (A_j X) over its query heads (every query row, and the strided
subset), on each attention variant (GQA, q/k norm, sliding window); per-head GPTQ rounds each
head against its own Hessian; the staged pass takes each sub-block's Hessian from the already
rounded layer and yields the rounded layer's outputs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_tiny_model
from lowbit.models.loader import build_fp_model
from lowbit.models.registry import resolve_config
from lowbit.models.transformer import rotary_for
from lowbit.models.weights import iter_tensors
from lowbit.quant.activations import ActivationStore, positions_for, run_layer
from lowbit.quant.gptq import GptqConfig, HessianAccumulator, gptq_quantize, gptq_quantize_heads
from lowbit.quant.gptq_hessian import AttentionHessian
from lowbit.quant.gptq_sequential import gptq_sequential
from lowbit.quant.rtn import QuantSpec, linear_names


def tiny_layer(tmp_path, arch, **overrides):
    make_tiny_model(arch, tmp_path, **overrides)
    import json
    cfg = resolve_config(json.loads((tmp_path / "config.json").read_text()))
    model = build_fp_model(cfg, iter_tensors(tmp_path))
    return model.model.layers[0], cfg


def brute_force(attn, x, positions, rotary, rows, window):
    """2/n sum_j (A_j X)^T (A_j X) per kv head, with A_j from an explicit softmax."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rotary(positions, q, k)
    rep = attn.num_heads // attn.num_kv_heads
    out = []
    for g in range(attn.num_kv_heads):
        total, n = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64), 0
        for j in range(g * rep, (g + 1) * rep):
            s = torch.einsum("bqd,bkd->bqk", q[:, rows, j].double(), k[:, :, g].double()) / math.sqrt(attn.head_dim)
            i, kk = torch.tensor(rows)[:, None], torch.arange(t)[None, :]
            allowed = (kk <= i) & ((i - kk < window) if window else True)
            a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
            y = (a @ x.double()).reshape(-1, x.shape[-1])
            total += y.t() @ y
            n += y.shape[0]
        out.append((total * 2 / n).float())
    return out


@pytest.mark.parametrize("arch,overrides,stride", [
    ("llama", {}, 1), ("llama", {}, 4), ("qwen3", {}, 3), ("mistral", {"num_key_value_heads": 1}, 1),
])
def test_attention_hessian_is_the_attention_weighted_input_hessian(tmp_path, arch, overrides, stride):
    layer, cfg = tiny_layer(tmp_path, arch, **overrides)
    rotary = rotary_for(cfg)
    x = torch.randn(2, 37, cfg.hidden_size)
    pos = positions_for(x)
    ah = AttentionHessian(layer.self_attn, query_stride=stride)
    with torch.no_grad():
        ah.add(x, pos, rotary)
        rows = list(range(36, -1, -stride))[::-1]
        ref = brute_force(layer.self_attn, x, pos, rotary, rows, layer.self_attn.window)
    got = ah.hessians()
    assert len(got) == cfg.num_kv_heads
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=2e-4, atol=2e-5)
    assert not torch.allclose(got[0], 2 * x.reshape(-1, x.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) / 74)


def test_sliding_window_restricts_the_attention_hessian(tmp_path):
    layer, cfg = tiny_layer(tmp_path, "llama")
    layer.self_attn.window = 5
    rotary = rotary_for(cfg)
    x = torch.randn(1, 23, cfg.hidden_size)
    pos = positions_for(x)
    ah = AttentionHessian(layer.self_attn, query_stride=2)
    with torch.no_grad():
        ah.add(x, pos, rotary)
        ref = brute_force(layer.self_attn, x, pos, rotary, list(range(22, -1, -2))[::-1], 5)
    for g, r in zip(ah.hessians(), ref):
        torch.testing.assert_close(g, r, rtol=2e-4, atol=2e-5)


def _store(cfg, n_chunks=3, seqs=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = ActivationStore()
    for _ in range(n_chunks):
        store.append(torch.randn(seqs, t, cfg.hidden_size, generator=g))
    return store


@pytest.mark.parametrize("arch,cache", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)])
def test_sequential_pass_rounds_each_sub_block_on_the_rounded_layers_inputs(tmp_path, arch, cache):
    """o_proj's Hessian is that of the attention output of the *rounded* q/k/v, down_proj's that of
    the rounded gate/up; the pass's outputs are the rounded layer's forward (the next store)."""
    layer, cfg = tiny_layer(tmp_path, arch)
    fp = copy.deepcopy(layer)
    rotary = rotary_for(cfg)
    store, spec, gcfg = _store(cfg), QuantSpec(3, 16), GptqConfig()
    seq = gptq_sequential(layer, rotary, store, spec, gcfg, act_cache_bytes=1 << 30 if cache else 0)
    assert sorted(seq.results) == sorted(linear_names(layer))
    for name, r in seq.results.items():  # loaded into the layer
        torch.testing.assert_close(layer.get_submodule(name).weight.data, r.dequantize())

    def input_hessian(module, model):
        acc = HessianAccumulator(module(model).in_features)
        hd = module(model).register_forward_hook(lambda _m, args, _o: acc.add(args[0]))
        with torch.no_grad():
            for h in store:
                run_layer(model, h, rotary)
        hd.remove()
        return acc.hessian()

    o_rounded = input_hessian(lambda m: m.self_attn.o_proj, layer)
    o_fp = input_hessian(lambda m: m.self_attn.o_proj, fp)
    assert not torch.allclose(o_rounded, o_fp, rtol=1e-3, atol=0)
    want = gptq_quantize(fp.self_attn.o_proj.weight.data, o_rounded, spec, gcfg)
    assert torch.equal(seq.results["self_attn.o_proj"].qweight.q, want.qweight.q)
    down = gptq_quantize(fp.mlp.down_proj.weight.data, input_hessian(lambda m: m.mlp.down_proj, layer), spec, gcfg)
    same = (seq.results["mlp.down_proj"].qweight.q == down.qweight.q).float().mean()
    assert same > 0.99  # the attention output is kept in float16 between stages
    with torch.no_grad():
        for got, h in zip(seq.next_store, store):
            want_out = run_layer(layer, h, rotary)
            assert float((got - want_out).norm() / want_out.norm()) < 2e-3


@pytest.mark.parametrize("order", [None, "group", "weight"])
def test_heads_round_against_their_own_hessians(order):
    torch.manual_seed(0)
    hs = []
    for _ in range(3):
        x = torch.randn(512, 64) @ torch.randn(64, 64) * torch.rand(64) * 3
        hs.append(2 * x.t() @ x / 512)
    w = torch.randn(3 * 8, 64)
    spec, cfg = QuantSpec(4, 16), GptqConfig(act_order=order)
    got = gptq_quantize_heads(w, hs, spec, cfg)
    if order is None:
        for i, h in enumerate(hs):
            alone = gptq_quantize(w[8 * i : 8 * i + 8], h, spec, cfg)
            assert torch.equal(got.qweight.q[8 * i : 8 * i + 8], alone.qweight.q)
            assert torch.equal(got.qweight.scales[8 * i : 8 * i + 8], alone.qweight.scales)
    if order == "group":
        assert torch.equal(got.perm, torch.argsort(sum(torch.diagonal(h) for h in hs), descending=True, stable=True))
    else:
        assert got.perm is None
    errs = [float(((got.dequantize()[8 * i : 8 * i + 8] - w[8 * i : 8 * i + 8]) @ h
                   @ (got.dequantize()[8 * i : 8 * i + 8] - w[8 * i : 8 * i + 8]).t()).trace()) / 16 for i, h in enumerate(hs)]
    assert got.err == pytest.approx(sum(errs) / 3, rel=1e-3)
    assert got.err < got.err_rtn


def test_heads_must_split_the_rows():
    from lowbit.errors import QuantizationError
    with pytest.raises(QuantizationError, match="do not split"):
        gptq_quantize_heads(torch.randn(10, 16), [torch.eye(16)] * 3, QuantSpec(4, 16))


@pytest.mark.parametrize("d", [64, 1030])
def test_hessian_accumulator_blocked_sum_is_the_full_symmetric_product(d):
    """Wide inputs sum only the upper trapezoid of each row block and mirror it once."""
    g = torch.Generator().manual_seed(d)
    xs = [torch.randn(3, 50, d, generator=g) * torch.rand(d, generator=g) for _ in range(3)]
    acc = HessianAccumulator(d)
    for x in xs:
        acc.add(x)
    assert (len(acc._edges) - 1) == (4 if d >= 1024 else 1)
    flat = torch.cat([x.reshape(-1, d) for x in xs]).double()
    want = 2 * flat.t() @ flat / flat.shape[0]
    got = acc.hessian()
    assert torch.equal(got, got.t())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
