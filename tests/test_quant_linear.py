"""QuantLinear / QuantEmbedding: exactness against the dequantized reference, every code path.

The reference is float64 `x @ qw.dequantize().T + bias`; the kernels must match it to ~1e-4
relative (they reorder fp32 sums; the default gemv, up to 12 rows, also rounds x to int16 per 64
weights, which is checked against its own worst-case bound). Every kernel path (gemv with int16 or
fp32 x, blocked small/large M, tiled sgemm) is checked on every compiled variant this machine runs,
and the pure-torch fallback too, since which one runs depends on M, on the CPU and on the build.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from lowbit import kernels
from lowbit.errors import QuantizationError
from lowbit.layers.linear import QuantEmbedding, QuantLinear, quantize_embedding
from lowbit.layers.qweight import QuantizedWeight

RTOL = 1e-4


def make_qweight(n: int, k: int, bits: int, group: int | None, sym: bool, seed: int = 0) -> QuantizedWeight:
    """Random codes with realistic scales; group=None means per-channel."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group is None else group
    ng = k // g
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, ng, generator=gen) * 0.02 + 1e-3
    if sym:
        zeros = torch.full((n, ng), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 1 << bits, (n, ng), dtype=torch.uint8, generator=gen)
    return QuantizedWeight(q, scales, zeros, bits, g, sym)


def reference(qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ qw.dequantize(torch.float64).t()
    return y if bias is None else y + bias.double()


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= RTOL * scale, f"max abs err {err:.3e} > {RTOL} * {scale:.3e}"


@pytest.fixture
def backend(kernel_impl):
    """Runs a test on each compiled variant this machine runs and on the pure-torch fallback."""
    assert kernels.available() == (kernel_impl != "ref")
    return kernel_impl


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_matches_dequantized_reference(backend, bits, group, sym, m):
    n, k = 37, 256  # odd out_features on purpose
    qw = make_qweight(n, k, bits, group, sym, seed=bits * 100 + m)
    bias = torch.randn(n) * 0.1
    layer = QuantLinear.from_quantized(qw, bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert_matches(layer(x), reference(qw, x, bias))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mode", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 5, 7, 64, 70])
def test_every_kernel_path(isa, bits, mode, m):
    """Forced kernels agree with the reference, including tails of every register tile."""
    qw = make_qweight(41, 576, bits, 64, sym=False, seed=m)
    layer = QuantLinear.from_quantized(qw, torch.randn(41))
    x = torch.randn(m, 576)
    assert_matches(layer.forward_mode(x, mode), reference(qw, x, layer.bias))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,group", [(576, 64), (512, 128), (576, None), (200, None)])
def test_int16_gemv_stays_within_its_rounding_bound(isa, bits, group, k):
    """The default gemv rounds x to int16 with one step per 64 weights (step = max|x_chunk| / 32767)
    and computes W x_rounded, so each output may move by at most sum_k |w_k| step_k / 2, no further;
    an outlier channel coarsens only its own chunk. A lane-order mistake would miss by ~|y|."""
    qw = make_qweight(67, k, bits, group, sym=False, seed=k + bits)
    layer = QuantLinear.from_quantized(qw, None)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(k))  # one pass of 4 rows + 2
    x[0, 3] = 300.0  # an outlier in the first chunk
    y = layer.forward_mode(x, 1).double()
    ref = reference(qw, x, None)
    kp = (k + 63) // 64 * 64
    xc = torch.nn.functional.pad(x.double().abs(), (0, kp - k)).view(6, -1, 64)
    step = (xc.amax(2) / 32767).repeat_interleave(64, dim=1)[:, :k]  # [6, k]
    bound = step @ qw.dequantize(torch.float64).abs().t() / 2  # the result is W x_rounded
    err = (y - ref).abs()
    assert (err <= bound * 1.01 + 1e-6 * ref.abs().max()).all(), (err / bound).max()
    # and it really is the int16 path: the fp32-x gemv is exact to fp32 rounding
    assert (layer.forward_mode(x, 4).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int16_gemv_keeps_non_finite_inputs_non_finite(isa):
    """NaN or Inf in x must reach the output as the fp32 path would, never a rounded finite value."""
    qw = make_qweight(16, 576, 4, 64, sym=False)
    layer = QuantLinear.from_quantized(qw, None)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 576)
        x[0, 100] = bad
        assert not torch.isfinite(layer.forward_mode(x, 1)).all()
        assert not torch.isfinite(layer.forward_mode(x, 0)).all()
        # among other rows: only that row is affected, the rest are what they are alone
        xs = torch.randn(5, 576)
        xs[2, 7] = bad
        y = layer.forward_mode(xs, 1)
        assert not torch.isfinite(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()
        assert torch.equal(y[[0, 1, 3, 4]], layer.forward_mode(xs[[0, 1, 3, 4]], 1))


@pytest.mark.parametrize("bits", [4, 8])
def test_auto_runs_the_int16_gemv_up_to_twelve_rows(isa, bits):
    """Decode batches of up to 12 rows take gemv16 (fewer uops than dequantizing to fp32); from 13
    rows on the blocked kernel; groups of 32 keep the gemv for M = 1 only."""
    layer = QuantLinear.from_quantized(make_qweight(50, 576, bits, 64, sym=False), None)
    for m, mode in ((1, 1), (3, 1), (12, 1), (13, 2), (16, 2)):
        x = torch.randn(m, 576)
        assert torch.equal(layer(x), layer.forward_mode(x, mode)), (m, mode)
    g32 = QuantLinear.from_quantized(make_qweight(50, 576, 4, 32, sym=False), None)
    x = torch.randn(3, 576)
    assert torch.equal(g32(x), g32.forward_mode(x, 2))


def test_int16_gemv_handles_tiny_and_zero_inputs(isa):
    """A zero chunk and inputs so small that 1 / step would overflow (they take the fp32-x gemv)
    still give the exact products, never a saturated code."""
    qw = make_qweight(20, 576, 4, 64, sym=False)
    layer = QuantLinear.from_quantized(qw, None)
    x = torch.randn(3, 576)
    x[0, :64] = 0.0
    x[1] *= 1e-35
    x[2] = 0.0
    ref = reference(qw, x, None)
    y = layer.forward_mode(x, 1)
    assert (y[0].double() - ref[0]).abs().max() <= 1e-4 * ref[0].abs().max()
    assert torch.equal(y[1], layer.forward_mode(x[1:2], 4)[0])  # the fp32-x gemv, bit for bit
    assert torch.equal(y[2], torch.zeros(20))


def test_groups_of_32_use_the_fp32_x_gemv(isa):
    """Two 32-weight groups share each 64-weight chunk's int16 lanes, so they keep fp32 x: the
    default M = 1 path is then the fp32-x gemv, bit for bit."""
    qw = make_qweight(33, 256, 4, 32, sym=False)
    layer = QuantLinear.from_quantized(qw, None)
    x = torch.randn(1, 256)
    assert torch.equal(layer.forward_mode(x, 1), layer.forward_mode(x, 4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [40, 300])  # per-thread L2 tiles, and whole-weight tiles
@pytest.mark.parametrize("inference", [True, False])
def test_sgemm_path_with_several_tiles_on_two_threads(isa, bits, m, inference):
    """The sgemm path splits W into tiles shared out to threads; worker threads must write the
    output under the caller's inference mode (the engine runs in torch.inference_mode)."""
    qw = make_qweight(1000, 576, bits, 64, sym=False, seed=m)  # 1000 rows: 4 even tiles of 256 (last 232)
    layer = QuantLinear.from_quantized(qw, torch.randn(1000))
    x = torch.randn(m, 576)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode(inference):
            y = layer.forward_mode(x, 3)
    finally:
        torch.set_num_threads(threads)
    assert_matches(y, reference(qw, x, layer.bias))


@pytest.mark.parametrize("k", [100, 200, 520])
def test_per_channel_with_in_features_not_multiple_of_64(backend, k):
    """Per-channel weights with K that needs padding to the kernel's 8/64-wide blocks."""
    for bits in (4, 8):
        qw = make_qweight(13, k, bits, None, sym=False)
        layer = QuantLinear.from_quantized(qw, None)
        for m in (1, 9):
            x = torch.randn(m, k)
            assert_matches(layer(x), reference(qw, x, None))


def test_model_shapes_and_leading_dims(backend):
    """Default-model shapes, [batch, seq, hidden] input and a bf16 input (computed in fp32)."""
    qw = make_qweight(192, 576, 4, 64, sym=True)
    layer = QuantLinear.from_quantized(qw, None)
    x = torch.randn(2, 3, 576)
    y = layer(x)
    assert y.shape == (2, 3, 192)
    assert_matches(y.reshape(6, 192), reference(qw, x.reshape(6, 576), None))
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), y, rtol=2e-2, atol=2e-2 * y.abs().max().item())


def test_module_dtype_casts_keep_kernel_buffers(backend):
    """model.half()/bfloat16() must not round the scales: the layer computes in fp32 anyway."""
    qw = make_qweight(16, 128, 4, 32, sym=False)
    layer = QuantLinear.from_quantized(qw, torch.randn(16))
    x = torch.randn(2, 128)
    y = layer(x)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and layer.packed.dtype == torch.uint8
    assert torch.equal(layer(x), y)


def test_dequantize_roundtrip(backend):
    qw = make_qweight(9, 192, 3, 32, sym=False)
    layer = QuantLinear.from_quantized(qw, None)
    assert torch.allclose(layer.dequantize(), qw.dequantize(), rtol=1e-6, atol=1e-7)


def test_attributes_and_resident_memory():
    n, k = 1536, 576
    fp32_bytes = n * k * 4
    for bits, group in ((4, 32), (4, 64), (3, None), (2, 64)):
        layer = QuantLinear.from_quantized(make_qweight(n, k, bits, group, sym=False), torch.zeros(n))
        assert (layer.in_features, layer.out_features, layer.bits) == (k, n, bits)
        assert layer.group_size == (k if group is None else group)
        assert layer.weight_bytes() <= 0.40 * fp32_bytes
        # No fp32 copy of W anywhere in the module, and no buffer pins a larger storage.
        assert all(b.numel() < n * k or b.dtype == torch.uint8 for b in layer.buffers())
        assert all(b.untyped_storage().nbytes() == b.numel() * b.element_size() for b in layer.buffers())
    for bits in (4, 8):  # symmetric: one shared offset, which must not pin the zeros tensor
        sym = QuantLinear.from_quantized(make_qweight(n, k, bits, 64, sym=True))
        assert sym.offset.numel() == 1 and sym.offset.untyped_storage().nbytes() == 4
        assert sym.weight_bytes() <= (0.16 if bits == 4 else 0.27) * fp32_bytes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "2..8-bit"),
        (dict(bits=9), "2..8-bit"),
        (dict(group=48), "does not divide"),
        (dict(k=96, group=12), "multiple of 8"),
    ],
)
def test_impossible_parameters_raise_quantization_error(kwargs, match):
    bits = kwargs.get("bits", 4)
    k = kwargs.get("k", 128)
    group = kwargs.get("group", 32)
    q = torch.zeros(8, k, dtype=torch.uint8)
    ng = max(1, k // group)
    qw = QuantizedWeight(q, torch.ones(8, ng), torch.zeros(8, ng, dtype=torch.uint8), bits, group, False)
    with pytest.raises(QuantizationError, match=match):
        QuantLinear.from_quantized(qw)


def test_out_of_range_codes_and_bad_shapes_raise():
    qw = make_qweight(8, 64, 4, 32, sym=False)
    qw.q[0, 0] = 16
    with pytest.raises(QuantizationError, match="range"):
        QuantLinear.from_quantized(qw)
    qw = make_qweight(8, 64, 4, 32, sym=False)
    qw.scales = qw.scales[:, :1]
    with pytest.raises(QuantizationError, match="shape"):
        QuantLinear.from_quantized(qw)
    with pytest.raises(QuantizationError, match="bias"):
        QuantLinear.from_quantized(make_qweight(8, 64, 4, 32, sym=False), torch.zeros(9))


def test_quantized_embedding_and_lm_head(backend):
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = 1000, 576
    w = torch.randn(vocab, hidden, generator=gen) * 0.05
    emb, head = quantize_embedding(w)
    assert isinstance(emb, QuantEmbedding)
    assert emb.q.data_ptr() == head.packed.data_ptr()  # tied: the int8 table exists once
    ids = torch.tensor([[0, 5, 999], [3, 3, 1]])
    rows = emb(ids)
    assert rows.shape == (2, 3, hidden) and rows.dtype == torch.float32
    step = w.abs().amax(dim=1) / 127
    assert ((rows - w[ids]).abs() <= step[ids].unsqueeze(-1) * 0.5 + 1e-7).all()
    x = torch.randn(4, hidden, generator=gen)
    logits = head(x)
    ref = x @ w.t()
    rel = (logits - ref).norm() / ref.norm()
    assert rel < 1e-2
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    # The head is exactly the dequantized int8 table.
    assert_matches(logits, x.double() @ emb(torch.arange(vocab)).double().t())
    assert head.weight_bytes() < 0.26 * w.numel() * 4


@pytest.mark.parametrize("failure", ["not built", "broken build"])
def test_missing_kernels_fall_back_with_one_warning(monkeypatch, failure):
    """An install without a compiler (no module built) or a module that fails to load must not
    break inference: warn once, then use the torch path."""
    monkeypatch.delenv("LOWBIT_NO_EXT", raising=False)
    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    kernels.reset()

    def broken_load(variant):
        raise ImportError(f"{variant.module}: undefined symbol")

    if failure == "not built":
        monkeypatch.setattr(kernels.REGISTRY, "_find", lambda module: None)
    else:
        monkeypatch.setattr(kernels.REGISTRY, "_load", broken_load)
    qw = make_qweight(16, 128, 4, 32, sym=False)
    layer = QuantLinear.from_quantized(qw, None)
    x = torch.randn(3, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = layer(x)
        y2 = QuantLinear.from_quantized(qw, None)(x)
    assert sum(issubclass(c.category, RuntimeWarning) for c in caught) == 1
    assert_matches(y1, reference(qw, x, None))
    assert torch.equal(y1, y2)
    monkeypatch.undo()
    kernels.reset()


def test_no_ext_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv("LOWBIT_NO_EXT", "1")
    kernels.reset()
    assert kernels.get() is None and not kernels.available()
    monkeypatch.undo()
    kernels.reset()
