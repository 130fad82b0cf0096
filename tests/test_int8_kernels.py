"""Int8-activation kernels (quantize_per_token, w8a8_linear, w4a8_linear) against their torch
references (lowbit/kernels/ref.py), per instruction-set variant, and the packers / layers above them
(lowbit/layers/linear_int8.py). The avx512 cases skip on CPUs without AVX-512 VNNI (or builds without it)."""
from __future__ import annotations

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import ref
from lowbit.layers.linear import QuantLinear
from lowbit.layers.linear_int8 import (
    W4A8Linear,
    W8A8Linear,
    pack_w4,
    pack_w8,
    quantized_weight_of,
    use_int8_activations,
)
from lowbit.layers.qweight import QuantizedWeight

MS = (1, 3, 13, 14, 17, 23, 64, 300)  # every register-tile height 1..8 (AVX-512 VNNI: 8 rows; AVX2: 4)


@pytest.fixture
def ext(isa):
    """The int8 ops of one compiled variant (conftest's `isa`: avx512 and avx2, each skipped where
    this CPU or build lacks it)."""
    ops = kernels.INT8.get()
    assert ops is not None and kernels.choices()["w8a8_linear"].impl == f"cpu-{isa}"
    return ops


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random rows with the cases that break int8 schemes: an outlier row, an outlier channel, an
    all-zero row (when there are enough rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, min(5, k - 1)] *= 40.0  # outlier channel
    if m > 1:
        x[1] *= 1000.0  # outlier token
    if m > 2:
        x[2] = 0.0  # all-zero token
    return x


def int8_weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)


# ----------------------------------------------------------------------------- quantize_per_token
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [1, 100, 576])
def test_quantize_per_token_matches_reference_exactly(ext, m, k):
    x = activations(m, k)
    q, s = ext.quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x)
    assert q.dtype == torch.int8 and q.shape == (m, k) and s.shape == (m,)
    assert torch.equal(q, rq)
    torch.testing.assert_close(s, rs, rtol=1e-7, atol=0)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    if m > 2:
        assert float(s[2]) == 0.0 and not q[2].any()


def test_non_finite_rows_give_nan_outputs_only_there(ext):
    x = torch.randn(4, 72)
    x[1, 5], x[3, 70] = float("nan"), float("inf")
    q, s = ext.quantize_per_token(x)
    rq, rs = ref.quantize_per_token(x)
    assert torch.equal(q, rq) and not q[1].any() and not q[3].any()
    assert s[1].isnan() and s[3].isnan() and rs[1].isnan() and torch.isfinite(s[[0, 2]]).all()
    layer = W8A8Linear.from_float(torch.randn(20, 72))
    w4 = W4A8Linear.from_quantized(w4_weight(20, 72, 8))
    for y in (layer(x), w4(x)):
        assert y[[1, 3]].isnan().all() and torch.isfinite(y[[0, 2]]).all()


def test_quantize_per_token_keeps_leading_dims(ext):
    x = torch.randn(2, 3, 40)
    q, s = ext.quantize_per_token(x)
    assert q.shape == (2, 3, 40) and s.shape == (2, 3)
    torch.testing.assert_close(q.float() * s.unsqueeze(-1), x, atol=float(s.max()) / 2 + 1e-6, rtol=0)


# ----------------------------------------------------------------------------- W8A8
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", [(40, 100), (576, 576), (17, 1536)])
def test_w8a8_matches_reference(ext, m, n, k):
    w = int8_weight(n, k)
    scale = torch.rand(n) * 0.01 + 1e-3
    bias = torch.randn(n)
    packed, rowsum = pack_w8(w)
    w_scale = torch.nn.functional.pad(scale, (0, packed.shape[0] * 16 - n))
    x = activations(m, k)
    for b in (None, bias):
        got = ext.w8a8_linear(x, packed, w_scale, rowsum, b, n)
        want = ref.w8a8_linear(x, packed, w_scale, rowsum, b, n)
        assert got.shape == (m, n)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if m > 2:
        assert torch.equal(got[2], bias)  # a zero token gives exactly the bias


def test_w8a8_dispatcher_op_and_dtypes(ext):
    name = kernels.choices()["w8a8_linear"].impl.split("-")[1]
    layer = W8A8Linear.from_float(torch.randn(24, 72), torch.randn(24))
    x = torch.randn(5, 72)
    y = layer(x)
    op = getattr(torch.ops, f"lowbit_{name}").w8a8_linear
    assert torch.equal(op(x, layer.packed, layer.w_scale, layer.rowsum, layer.bias, 24), y)
    yb = layer(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and yb.shape == (5, 24)


def test_w8a8_layer_is_close_to_the_float_matmul(ext):
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(33, 256)
    layer = W8A8Linear.from_float(w)
    want = x @ w.t()
    err = (layer(x) - want).norm() / want.norm()
    assert err < 0.02, err
    assert torch.equal(layer.int8_weight(), torch.round(w / (w.abs().amax(1, keepdim=True) / 127)).to(torch.int8))


# ----------------------------------------------------------------------------- W4A8
def w4_weight(n: int, k: int, group: int, bits: int = 4, seed: int = 2) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    ng = k // group
    return QuantizedWeight(
        q=torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8),
        scales=torch.rand(n, ng, generator=g) * 0.02 + 1e-3,
        zeros=torch.randint(0, 2**bits, (n, ng), generator=g, dtype=torch.uint8),
        bits=bits, group_size=group,
    )


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,group", [(40, 128, 32), (576, 576, 64), (24, 100, 100), (17, 1536, 128)])
def test_w4a8_matches_reference(ext, m, n, k, group):
    layer = W4A8Linear.from_quantized(w4_weight(n, k, group), torch.randn(n))
    x = activations(m, k)
    args = (layer.packed, layer.scales, layer.zero_scales, layer.bias, n, layer.group)
    got, want = ext.w4a8_linear(x, *args), ref.w4a8_linear(x, *args)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


def test_w4a8_is_close_to_the_weight_only_layer(ext):
    qw = w4_weight(64, 256, 64)
    bias = torch.randn(64)
    w4a16, w4a8 = QuantLinear.from_quantized(qw, bias), W4A8Linear.from_quantized(qw, bias)
    torch.testing.assert_close(w4a8.dequantize(), qw.dequantize())
    x = torch.randn(9, 256)
    want = w4a16(x)
    err = (w4a8(x) - want).norm() / want.norm()
    assert 0 < err < 0.02, err


def test_w4a8_scales_activations_per_group(ext):
    """W4A8 computes W4A16 on x rounded with one int8 scale per token and weight group: an outlier
    channel coarsens only its own group (per token, every group would share its step)."""
    qw = w4_weight(64, 256, 64)
    w4a16, w4a8 = QuantLinear.from_quantized(qw), W4A8Linear.from_quantized(qw)
    x = torch.randn(5, 256)
    x[:, 3] = 5000.0  # group 0 only

    def rounded(groups: int) -> torch.Tensor:
        q, s = ref.quantize_per_token(x.view(5, groups, -1))
        return (q.float() * s.unsqueeze(-1)).view(5, 256)

    got, per_group, per_token = w4a8(x), w4a16(rounded(4)), w4a16(rounded(1))
    assert float((got - per_group).norm() / per_group.norm()) < 1e-5
    assert float((per_token - per_group).norm() / per_group.norm()) > 1e-3


# ----------------------------------------------------------------------------- packing, fallback
def test_packers_round_trip():
    w = int8_weight(37, 100)
    packed, rowsum = pack_w8(w)
    assert packed.shape == (3, 26, 16, 4)
    assert torch.equal(ref.unpack_w8(packed, 37)[:, :100], w)
    assert torch.equal(rowsum[:37], w.sum(1, dtype=torch.int32)) and not rowsum[37:].any()
    q = torch.randint(0, 16, (37, 104), dtype=torch.uint8)
    assert torch.equal(ref.unpack_w4(pack_w4(q, 8), 37), q)


@pytest.mark.parametrize("group", [32, 64, 96])
def test_quant_linear_gives_back_its_weight(group):
    qw = w4_weight(20, 192, group, bits=3)
    back = quantized_weight_of(QuantLinear.from_quantized(qw))
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales) and back.group_size == group


def test_use_int8_activations_swaps_only_4bit_linears():
    model = torch.nn.Sequential(QuantLinear.from_quantized(w4_weight(16, 64, 32)),
                                QuantLinear.from_quantized(w4_weight(16, 16, 16, bits=8)))
    assert use_int8_activations(model) == 1
    assert isinstance(model[0], W4A8Linear) and isinstance(model[1], QuantLinear)


def test_reference_path_without_the_extension(monkeypatch):
    monkeypatch.setenv("LOWBIT_NO_EXT", "1")
    kernels.reset()
    try:
        assert kernels.INT8.get() is None
        layer = W8A8Linear.from_float(torch.randn(24, 40))
        x = torch.randn(3, 40)
        assert torch.equal(layer(x), ref.w8a8_linear(x, layer.packed, layer.w_scale, layer.rowsum, None, 24))
    finally:
        monkeypatch.undo()
        kernels.reset()


@pytest.mark.parametrize("m", [32, 64, 300])
def test_w8a8_through_onednn_is_bit_identical_to_the_panel_kernel(ext, m):
    """On AMX-INT8 CPUs large M goes through torch._int_mm (oneDNN) instead of the VNNI panel kernel:
    the same integer sums and the same epilogue order, so the same bits (lean-loop route included)."""
    if "amx_int8" not in kernels.REGISTRY.cpu.flags:
        pytest.skip("torch._int_mm is used only on CPUs with AMX-INT8")
    g = torch.Generator().manual_seed(m)
    lin = W8A8Linear.from_int8(int8_weight(72, 200), torch.rand(72, generator=g) * 0.01, torch.randn(72, generator=g))
    x = activations(m, 200)
    panel = ext.w8a8_linear(x, *lin._args())
    assert torch.equal(lin(x), panel)
    assert torch.equal(lin.direct()(x), panel)
    assert "_plain_w" in lin.__dict__  # the plain copy was made for the large call
    small = activations(3, 200)
    assert torch.equal(lin.direct()(small), ext.w8a8_linear(small, *lin._args()))
