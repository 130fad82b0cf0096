"""RTN quantization grid and int32 packing, checked against hand-derived values."""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import QuantizationError
from lowbit.quant.primitives import (
    AWQ_ORDER,
    fake_quantize,
    pack_int32,
    packed_words,
    quantize_weight,
    quantize_weight_searched,
    unpack_int32,
)

GROUPS = [32, 64, 128, -1]


def _weight(out=16, inp=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=g) * 0.05).to(dtype)


# ----------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_within_half_a_step(bits, group_size, sym):
    w = _weight()
    qw = quantize_weight(w, bits, group_size, sym=sym)
    g = w.shape[1] if group_size == -1 else group_size
    assert qw.group_size == g
    assert qw.q.dtype == torch.uint8 and qw.zeros.dtype == torch.uint8 and qw.scales.dtype == torch.float32
    assert qw.q.shape == w.shape and qw.scales.shape == (w.shape[0], w.shape[1] // g)
    assert int(qw.q.max()) <= 2**bits - 1
    step = qw.scales.repeat_interleave(g, dim=1)
    err = (qw.dequantize() - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
    if sym:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
        assert int(qw.q.min()) >= 1  # AutoAWQ's symmetric grid never uses the most negative code


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_fake_quantize_matches_quantize_then_dequantize(sym, group_size):
    w = _weight(seed=1)
    before = w.clone()
    fq = fake_quantize(w, 4, group_size, sym)
    assert torch.equal(w, before)  # the input is not modified in place
    assert torch.equal(fq, quantize_weight(w, 4, group_size, sym).dequantize())


def test_fake_quantize_keeps_dtype():
    w = _weight(dtype=torch.float16)
    fq = fake_quantize(w, 4, 64)
    assert fq.dtype == torch.float16 and fq.shape == w.shape
    # half precision may round a borderline weight to the neighbouring code, never further
    step = quantize_weight(w, 4, 64).scales.repeat_interleave(64, dim=1)
    assert bool(((fq.float() - w.float()).abs() <= step * 0.51 + 1e-4).all())


def test_asymmetric_grid_matches_awq_formula():
    """scale = (max - min) / 15, zero = round(-min / scale) for one hand-made 4-bit group."""
    w = torch.linspace(-0.3, 1.2, 32).reshape(1, 32)
    qw = quantize_weight(w, 4, 32)
    assert qw.scales.item() == pytest.approx(1.5 / 15)
    assert qw.zeros.item() == round(0.3 / 0.1)
    assert qw.q[0, 0].item() == 0 and qw.q[0, -1].item() == 15


def test_symmetric_grid_matches_awq_formula():
    w = torch.linspace(-0.7, 0.35, 32).reshape(1, 32)
    qw = quantize_weight(w, 4, 32, sym=True)
    assert qw.scales.item() == pytest.approx(0.7 / 7)
    assert qw.q[0, 0].item() == 8 - 7


def test_one_sided_group_stays_accurate():
    """A group of all-positive weights: zero must stay on the grid (0 is kept in range)."""
    w = torch.full((1, 32), 0.5) + torch.arange(32).reshape(1, 32) * 1e-3
    qw = quantize_weight(w, 4, 32)
    assert (qw.dequantize() - w).abs().max() <= qw.scales.max() / 2 + 1e-7


def test_zero_group_has_no_nan():
    w = torch.zeros(8, 64)
    for sym in (False, True):
        qw = quantize_weight(w, 4, 32, sym=sym)
        assert bool((qw.scales > 0).all())
        assert torch.equal(qw.dequantize(), w)
        assert torch.equal(fake_quantize(w, 4, 32, sym), w)


def test_clip_max_val():
    w = _weight(out=4, inp=64)
    w[0, 0] = 5.0  # one outlier
    max_val = torch.full((4, 2), 0.1)
    qw = quantize_weight(w, 4, 32, max_val=max_val)
    deq = qw.dequantize()
    assert qw.scales.max() <= 0.2 / 15 + 1e-7  # the outlier no longer widens the grid
    assert deq.abs().max() <= 0.1 + qw.scales.max() / 2 + 1e-6  # grid shifted by the rounded zero
    assert torch.equal(fake_quantize(w, 4, 32, max_val=max_val.unsqueeze(-1)), deq)  # AutoAWQ's [out, g, 1]


def test_scale_dtype_rounds_scales_first():
    w = _weight()
    qw = quantize_weight(w, 4, 128, scale_dtype=torch.float16)
    assert torch.equal(qw.scales, qw.scales.half().float())
    assert (qw.dequantize() - w).abs().max() <= qw.scales.max() * 0.51


def _weighted_err(qw, w, imp):
    return ((qw.dequantize() - w) ** 2 * imp).reshape(w.shape[0], -1, qw.group_size).sum(-1)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_searched_grid_never_worse_than_minmax_per_group(sym, bits):
    w = _weight(out=32, inp=128, seed=3)
    w[::5, 7] *= 8.0  # outliers: min/max wastes steps on them
    imp = torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.1
    for scale_dtype in (None, torch.float16):
        rtn = quantize_weight(w, bits, 32, sym, scale_dtype=scale_dtype)
        found = quantize_weight_searched(w, bits, 32, sym, importance=imp, scale_dtype=scale_dtype)
        e_rtn, e_found = _weighted_err(rtn, w, imp), _weighted_err(found, w, imp)
        assert (e_found <= e_rtn * (1 + 1e-6)).all()
        assert e_found.sum() < 0.95 * e_rtn.sum()
        if scale_dtype is not None:
            assert torch.equal(found.scales, found.scales.half().float())
    # the candidate 1.0 alone is min/max, bit for bit
    only = quantize_weight_searched(w, bits, 32, sym, importance=imp, scale_dtype=torch.float16, shrinks=(1.0,))
    rtn = quantize_weight(w, bits, 32, sym, scale_dtype=torch.float16)
    assert torch.equal(only.q, rtn.q) and torch.equal(only.scales, rtn.scales) and torch.equal(only.zeros, rtn.zeros)


def test_searched_grid_follows_the_importance():
    """An outlier on a channel that carries no activation is clipped; on a busy one it is kept."""
    w = _weight(out=1, inp=32, seed=5)
    w[0, 0] = 1.0
    quiet = torch.ones(32)
    quiet[0] = 0.0
    clipped = quantize_weight_searched(w, 3, 32, importance=quiet)
    kept = quantize_weight_searched(w, 3, 32, importance=torch.ones(32) + 100 * (torch.arange(32) == 0))
    assert clipped.dequantize()[0, 0] < 0.8 and kept.dequantize()[0, 0] > 0.9
    with pytest.raises(QuantizationError, match="importance"):
        quantize_weight_searched(w, 3, 32, importance=torch.ones(31))


def test_group_size_must_divide_in_features():
    with pytest.raises(QuantizationError) as e:
        quantize_weight(torch.zeros(8, 96), 4, 64)
    assert "64" in str(e.value) and "96" in str(e.value)
    with pytest.raises(QuantizationError):
        fake_quantize(torch.zeros(8, 96), 4, 64)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(QuantizationError):
        quantize_weight(torch.zeros(8, 64), bits, 32)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("order", ["dense", "padded"])
@pytest.mark.parametrize("n", [8, 32, 40, 100, 256])
def test_pack_round_trip(bits, order, n):
    v = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_int32(v, bits, order)
    assert packed.dtype == torch.int32 and packed.shape == (3, packed_words(n, bits, order))
    assert torch.equal(unpack_int32(packed, bits, n, order), v)


def test_awq_round_trip_and_reject_other_bits():
    v = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int32(v, 4, "awq")
    assert packed.shape == (5, 8)
    assert torch.equal(unpack_int32(packed, 4, 64, "awq"), v)
    with pytest.raises(QuantizationError):
        pack_int32(torch.zeros(1, 8, dtype=torch.uint8), 3, "awq")


def test_awq_nibble_order_by_hand():
    """Columns 0..7 hold 1..8. AutoAWQ puts column AWQ_ORDER[i] in nibble i, so the nibbles from
    low to high read 1,3,5,7,2,4,6,8, i.e. the word is 0x86427531."""
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    word = pack_int32(v, 4, "awq")
    assert word.item() == 0x86427531 - (1 << 32)
    assert torch.equal(unpack_int32(word, 4, 8, "awq"), v)


def test_dense_3bit_straddle_by_hand():
    """Value 10 of a 3-bit row starts at bit 30: its low two bits end word 0, its top bit opens word 1."""
    v = torch.zeros(1, 32, dtype=torch.uint8)
    v[0, 10] = 0b111
    v[0, 0] = 0b101
    words = pack_int32(v, 3, "dense").tolist()[0]
    assert words == [(0b11 << 30 | 0b101) - (1 << 32), 0b1, 0]
    # the old compressed-tensors layout keeps 10 values a word: value 10 opens word 1
    assert pack_int32(v, 3, "padded").tolist()[0][:2] == [0b101, 0b111]


def test_sequential_4bit_by_hand():
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_int32(v, 4, "dense").item() == 0x87654321 - (1 << 32)


def test_pack_rejects_out_of_range_values():
    with pytest.raises(QuantizationError):
        pack_int32(torch.tensor([[16]]), 4, "dense")


@pytest.mark.parametrize("bits", range(2, 9))
def test_dense_matches_compressed_tensors_library(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    v = torch.randint(0, 2**bits, (4, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    signed = (v.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(helpers.pack_to_int32(signed, bits), pack_int32(v, bits, "dense"))
    assert torch.equal(helpers.pack_to_int32(signed, bits, packed_dim=0), pack_int32(v.t(), bits, "dense").t())
