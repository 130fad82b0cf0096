"""bf16 matrix work with fp32 accumulation (EngineArgs.dtype, lowbit/layers/linear_bf16.py,
qgemm/bf16.cpp): the kernels against float64 references, per instruction-set variant, the layer swap,
and the engine and eval paths that use it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import kernels
from lowbit.engine.args import EngineArgs, resolve_dtype
from lowbit.errors import LowbitError
from lowbit.kernels import ref
from lowbit.layers.linear import QuantLinear
from lowbit.layers.linear_bf16 import BF16_MIN_M, Bf16Embedding, Bf16Linear, use_bf16
from lowbit.layers.qweight import QuantizedWeight

from conftest import make_tiny_model

#: bf16 has an 8-bit significand: one rounding is at most 2^-9 relative.
BF16_EPS = 2.0**-8


@pytest.fixture
def ext(isa):
    ops = kernels.get()
    assert ops is not None and kernels.choices()["bf16_linear"].impl == f"cpu-{isa}"
    return ops


def rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random rows with an outlier row and an all-zero row (when there are enough rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if m > 1:
        x[1] *= 1000.0
    if m > 2:
        x[2] = 0.0
    return x


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| per output row, relative to that row's sum |x| |w| scale."""
    return float(((got.double() - want).abs().amax(dim=-1) / want.abs().amax(dim=-1).clamp_min(1e-30)).max())


# ----------------------------------------------------------------------------- bf16_linear kernel
@pytest.mark.parametrize("m", [1, 3, 4, 5, 9, 16, BF16_MIN_M, 40])
@pytest.mark.parametrize("k", [8, 72, 100, 576])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_float64(ext, m, k, bias):
    n = 37
    g = torch.Generator().manual_seed(k)
    x, w = rows(m, k), torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    y = ext.bf16_linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # small M keeps x in fp32 (exact bf16 -> fp32 weights, fp32 sums); from 16 rows on x and the
    # product are rounded to bf16 (oneDNN's bf16 matmul, fp32 accumulation)
    xr = x.double() if m < 16 else x.to(torch.bfloat16).double()
    want = xr @ w.double().t() + (b.double() if bias else 0)
    assert rel_err(y, want) < (1e-5 if m < 16 else 2 * BF16_EPS)
    assert torch.all(y[2] == (b if bias else 0)) if m > 2 else True  # the all-zero row


def test_bf16_linear_rounds_x_to_nearest_even(ext):
    """Through the identity, the batched path returns exactly bf16(x) (round to nearest even)."""
    x = torch.randn(16, 100) * torch.logspace(-3, 3, 100)
    y = ext.bf16_linear(x, torch.eye(100, dtype=torch.bfloat16), None)
    assert torch.equal(y, x.to(torch.bfloat16).float())


def test_bf16_linear_propagates_non_finite_rows(ext):
    x = rows(20, 64)
    x[5, 3] = float("nan")
    x[6, 0] = float("inf")
    w = torch.randn(8, 64).to(torch.bfloat16)
    for m in (1, 20):  # the gemv and the matmul
        y = ext.bf16_linear(x[:m] if m > 1 else x[5:6], w, None)
        assert torch.isnan(y[5 if m > 1 else 0]).all()
    assert torch.isfinite(ext.bf16_linear(x[7:], w, None)).all()


def test_bf16_linear_rejects_bad_arguments(ext):
    w = torch.randn(8, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected input with 64 features"):
        ext.bf16_linear(torch.randn(2, 63), w, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.bf16_linear(torch.randn(2, 64), w.float(), None)
    with pytest.raises(RuntimeError, match="bias"):
        ext.bf16_linear(torch.randn(2, 64), w, torch.randn(7))


def test_bf16_linear_dispatcher_op_and_reference_agree(ext, isa):
    x, w, b = rows(20, 96), torch.randn(24, 96).to(torch.bfloat16), torch.randn(24)
    via_torch = getattr(torch.ops, f"lowbit_{isa}").bf16_linear(x, w, b)
    assert torch.equal(via_torch, ext.bf16_linear(x, w, b))
    assert rel_err(ref.bf16_linear(x, w, b), ext.bf16_linear(x, w, b).double()) < 2 * BF16_EPS


# ----------------------------------------------------------------------------- quantized linear in bf16
def quant_linear(n: int, k: int, bits: int = 4, group: int = 64, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    hi = (1 << bits) - 1
    qw = QuantizedWeight(
        q=torch.randint(0, hi + 1, (n, k), generator=g, dtype=torch.uint8),
        scales=torch.rand(n, k // group, generator=g) * 0.02 + 1e-3,
        zeros=torch.randint(0, hi + 1, (n, k // group), generator=g, dtype=torch.uint8),
        bits=bits, group_size=group, sym=False,
    )
    return QuantLinear.from_quantized(qw, torch.randn(n, generator=g))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [BF16_MIN_M, 100, 300])  # 300: the whole-W tile path (M >= 256)
@pytest.mark.parametrize("n,k", [(96, 128), (200, 576)])
def test_quant_linear_bf16_tiles_match_float64(ext, bits, m, n, k):
    lin = quant_linear(n, k, bits)
    x = rows(m, k)
    w = lin.dequantize().to(torch.bfloat16).double()
    want = x.to(torch.bfloat16).double() @ w.t() + lin.bias.double()
    got = lin.forward_mode(x, 5)
    assert rel_err(got, want) < 2 * BF16_EPS
    # the auto choice: bf16 from bf16_min_m rows on, the fp32 kernels below it
    lin.set_bf16_min_m(BF16_MIN_M)
    assert torch.equal(lin(x), got)
    fp = quant_linear(n, k, bits)
    small = x[: BF16_MIN_M - 1]
    assert torch.equal(lin(small), fp(small))


# ----------------------------------------------------------------------------- AMX tile path (qgemm/amx.h)
@pytest.fixture(params=["amx", "onednn"])
def amx(request, ext):
    """Runs a test with the AMX tile GEMM on and off (off: oneDNN's matmul, the path of CPUs without
    AMX). On a CPU without AMX (or the AVX2 build) both runs take the oneDNN path."""
    before = ext.set_amx_enabled(request.param == "amx")
    yield ext.amx_bf16_active()
    ext.set_amx_enabled(before)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, -1), (8, 64)])
@pytest.mark.parametrize("n", [37, 200])
@pytest.mark.parametrize("k,m", [(64, 64), (576, 17), (576, 80)])
def test_bf16_tiles_exact_through_the_identity(amx, ext, bits, group, n, k, m):
    """x = rows of the identity: every output is one bf16 weight times 1.0 plus zeros, so any path
    returns W's bf16 rounding exactly: checks the dequantization to bf16 (the 4-bit table lookup),
    the tile products' placement and the transposed stores, partial row blocks included."""
    g = k if group == -1 or k % group else group  # 128 does not divide 576: per channel there
    lin = quant_linear(n, k, bits, g, seed=k + n)
    lin.bias = None
    x = torch.eye(k)[:m].contiguous()
    got = lin.forward_mode(x, 5)
    want = lin.dequantize().to(torch.bfloat16).float().t()[:m]
    assert torch.equal(got, want)
    w = lin.dequantize().to(torch.bfloat16)
    assert torch.equal(ext.bf16_linear(x, w, None), want)  # stored bf16 W: the direct tile loads


@pytest.mark.parametrize("m", [16, 17, 33, 64, 96, 97])
def test_amx_and_onednn_against_float64(ext, m):
    """Both bf16 GEMMs round x and W alike. oneDNN's matmul also returns its product in bf16; the AMX
    tiles keep their fp32 sums, so that path is exact to fp32 accumulation order."""
    lin, x = quant_linear(200, 576, 4), rows(m, 576)
    lin.bias = None
    w = torch.randn(100, 576).to(torch.bfloat16)
    xb = x.to(torch.bfloat16).double()
    want = xb @ lin.dequantize().to(torch.bfloat16).double().t(), xb @ w.double().t()
    before = ext.set_amx_enabled(True)
    try:
        on = lin.forward_mode(x, 5), ext.bf16_linear(x, w, None)
        used = ext.amx_bf16_active() and 16 <= m <= 96
        ext.set_amx_enabled(False)
        assert not ext.amx_bf16_active()
        off = lin.forward_mode(x, 5), ext.bf16_linear(x, w, None)
    finally:
        ext.set_amx_enabled(before)
    for got, ref_ in zip(on, want):
        assert rel_err(got, ref_) < (1e-5 if used else 2 * BF16_EPS)
    for got, ref_ in zip(off, want):
        assert rel_err(got, ref_) < 2 * BF16_EPS


def test_quant_linear_bf16_without_extension(monkeypatch, kernel_impl):
    """The pure-torch path honours bf16_min_m too, and agrees with the kernels to bf16 rounding."""
    lin = quant_linear(64, 128)
    lin.set_bf16_min_m(4)
    x = rows(8, 128)
    want = x.to(torch.bfloat16).double() @ lin.dequantize().to(torch.bfloat16).double().t() + lin.bias.double()
    assert rel_err(lin(x), want) < 2 * BF16_EPS


# ----------------------------------------------------------------------------- the model swap
def test_use_bf16_swaps_linears_and_shares_a_tied_table(tmp_path):
    from lowbit.quant.loader import load_model

    make_tiny_model("llama", tmp_path, tie_word_embeddings=True)
    lm = load_model(tmp_path, with_tokenizer=False)
    fp_logits = lm.model.compute_logits(torch.randn(3, 64))
    dense, quant = use_bf16(lm.model)
    assert dense > 0 and quant == 0
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    assert isinstance(lm.model.lm_head, Bf16Linear) and isinstance(lm.model.model.embed_tokens, Bf16Embedding)
    assert lm.model.model.embed_tokens.weight is lm.model.lm_head.weight  # one bf16 table
    assert lm.model.lm_head.weight.dtype == torch.bfloat16
    del fp_logits


def test_bf16_model_stays_close_to_fp32(tmp_path):
    """A whole forward in bf16: logits within a few bf16 roundings of fp32's, the same top-1 at >= 80% of positions."""
    from lowbit.quant.loader import load_model

    make_tiny_model("qwen2", tmp_path)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    fp = load_model(tmp_path, with_tokenizer=False).model
    bf = load_model(tmp_path, with_tokenizer=False).model
    use_bf16(bf)
    with torch.inference_mode():
        a = fp.compute_logits(fp(ids)).double()
        b = bf.compute_logits(bf(ids)).double()
    assert float((a - b).abs().max() / a.abs().max()) < 0.05
    assert float((a.argmax(-1) == b.argmax(-1)).double().mean()) >= 0.8  # random: ~1/256


# ----------------------------------------------------------------------------- engine and args
def test_dtype_names_and_auto(monkeypatch):
    with pytest.raises(LowbitError, match="dtype must be one of"):
        EngineArgs(dtype="bf16")
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setenv("LOWBIT_DTYPE", "bfloat16")
    assert resolve_dtype("auto") == "bfloat16"
    monkeypatch.setenv("LOWBIT_DTYPE", "half")
    with pytest.raises(LowbitError, match="LOWBIT_DTYPE"):
        resolve_dtype("auto")
    monkeypatch.delenv("LOWBIT_DTYPE")
    native = kernels.native_bf16() and kernels.available()
    assert resolve_dtype("auto") == ("bfloat16" if native else "float32")


def test_kv_cache_dtype_auto_follows_the_matrix_dtype():
    from lowbit.engine.kv_cache import KVCacheSpec, normalize_kv_dtype

    assert normalize_kv_dtype("auto", "bfloat16") == "bf16" and normalize_kv_dtype("auto", "float32") == "fp32"
    assert normalize_kv_dtype("int8", "bfloat16") == "int8" and normalize_kv_dtype("fp32", "bfloat16") == "fp32"
    assert normalize_kv_dtype("bfloat16") == "bf16"
    with pytest.raises(LowbitError, match="kv_cache_dtype must be"):
        normalize_kv_dtype("fp16")
    with pytest.raises(LowbitError, match="kv_cache_dtype must be"):
        EngineArgs(kv_cache_dtype="fp16")
    fp32, bf16 = (KVCacheSpec(30, 3, 64, 16, d) for d in ("fp32", "bf16"))
    assert fp32.bytes_per_block == 2 * bf16.bytes_per_block and not bf16.quantized


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    from lowbit.kernels.cpu import CpuInfo

    for flags, native in ((("avx2", "avx512f"), False), (("avx2", "avx512_bf16"), True), (("amx_bf16",), True)):
        monkeypatch.setattr(kernels.REGISTRY, "_cpu", CpuInfo("test", frozenset(flags), "test"))
        assert kernels.native_bf16() is native
    kernels.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_bf16_greedy_matches_its_module_path(tmp_path, isa, arch):
    """The engine in bf16 (paged KV, batched prefill, the lean decode loop) gives the greedy tokens of
    the same bf16 model recomputed in full for every token through the module path. Every step here
    has fewer than 16 rows, so both run the same bf16 gemv and differ only in attention's fp32 order
    and the engine's bf16 KV cache (kv_cache_dtype auto under bfloat16) against exact k/v."""
    from lowbit.engine.llm import LLM
    from lowbit.engine.llm_engine import LLMEngine
    from lowbit.engine.sampling_params import SamplingParams

    make_tiny_model(arch, tmp_path)
    engine = LLMEngine(EngineArgs(model=str(tmp_path), dtype="bfloat16", kv_cache_memory=2**20, block_size=8))
    model = engine.runner.model
    assert engine.runner.shard.dtype == "bfloat16"
    assert engine.runner.shard.spec.dtype == "bf16" and engine.runner.shard.pool.k[0].dtype == torch.bfloat16
    assert any(isinstance(m, Bf16Linear) for m in model.modules())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 7)]
    outs = LLM.from_engine(engine).generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = list(p)
        with torch.inference_mode():
            for _ in range(5):
                ids.append(int(model.compute_logits(model(torch.tensor([ids])))[0, -1].argmax()))
        assert o.outputs[0].token_ids == ids[len(p):]


def test_eval_ppl_in_bf16_is_close_to_fp32(tmp_path):
    from lowbit.eval.perplexity import evaluate_ppl
    from test_server import save_tiny_tokenizer

    make_tiny_model("llama", tmp_path / "m", vocab_size=258)
    save_tiny_tokenizer(tmp_path / "m")
    text = tmp_path / "t.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(chr(97 + int(c)) for c in torch.randint(0, 26, (3000,), generator=g)))
    fp = evaluate_ppl(tmp_path / "m", text, seqlen=128, max_windows=2, progress=False)
    bf = evaluate_ppl(tmp_path / "m", text, seqlen=128, max_windows=2, progress=False, dtype="bfloat16")
    assert fp.ppl != bf.ppl and abs(bf.ppl / fp.ppl - 1) < 0.01
    with pytest.raises(LowbitError, match="dtype"):
        evaluate_ppl(tmp_path / "m", text, seqlen=128, max_windows=1, progress=False, dtype="half")
