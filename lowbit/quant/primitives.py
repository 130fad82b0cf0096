"""Round-to-nearest group quantization and int32 bit packing.

Conventions (shared with AutoAWQ / llm-awq, checked against their public code):

* Asymmetric ("zero point"): per group, ``scale = (max - min) / (2**bits - 1)`` and
  ``zero = round(-min / scale)``; ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``.
  Unlike AutoAWQ we first widen [min, max] to include 0 (as compressed-tensors does): for the
  usual group that straddles 0 this changes nothing, and for a group of one sign it keeps the
  zero point inside the integer grid instead of clamping every weight to the grid edge.
* Symmetric: ``scale = absmax / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)``, so the stored
  unsigned q lies in [1, 2**bits - 1] (signed [-(2**(bits-1)-1), 2**(bits-1)-1]). This is
  AutoAWQ's ``zero_point=False`` grid. compressed-tensors' own observer divides by
  ``(2**bits - 1) / 2`` instead and clamps +absmax to 2**(bits-1)-1; both grids are stored the
  same way (signed ints, no zero point), so either loads anywhere. Ours never clamps, which
  keeps the per-element error within scale/2.
* Scales are clamped to at least 1e-5 so an all-zero group does not divide by zero.

Packing: ``pack_int32`` stores unsigned values into int32 words in one of three orders
(see ``PackOrder``); the checkpoint formats build on it.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from lowbit.errors import QuantizationError
from lowbit.layers.qweight import QuantizedWeight

MIN_SCALE = 1e-5
MIN_BITS, MAX_BITS = 2, 8

# Nibble slot i of an AutoAWQ GEMM int32 holds column AWQ_ORDER[i] of its 8-column block
# (AutoAWQ WQLinear_GEMM.from_linear "order_map"; vLLM undoes it with [0,4,1,5,2,6,3,7]).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))

PackOrder = Literal["awq", "dense", "padded"]
"""
"awq":    4 bits only, 8 values a word, value of column AWQ_ORDER[i] in bits [4i, 4i+4).
"dense":  value i of a row at global bit i*bits, little-endian, words share values when
          bits does not divide 32 (compressed-tensors >= 0.18 pack-quantized).
"padded": 32 // bits values a word, value k of a word at bit k*bits, spare high bits zero
          (compressed-tensors <= 0.17). Identical to "dense" when bits divides 32.
"""


# ----------------------------------------------------------------------------- validation


def check_bits(bits: int) -> None:
    """Every kernel and format here handles 2..8 bits; reject the rest early and clearly."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """The real group size: -1/None/0 mean per-channel (one group spanning the whole row)."""
    if group_size is None or group_size in (-1, 0):
        return in_features
    if not isinstance(group_size, int) or group_size < 0:
        raise QuantizationError(f"group size must be a positive integer or -1, got {group_size!r}")
    if in_features % group_size != 0:
        raise QuantizationError(
            f"group size {group_size} does not divide the layer's in_features={in_features}; "
            f"use a group size that divides {in_features} or -1 (per-channel)"
        )
    return group_size


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    if w.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    g = resolve_group_size(w.shape[1], group_size)
    return w.reshape(-1, g), g


def _clip(x: torch.Tensor, max_val: torch.Tensor | None) -> torch.Tensor:
    """AWQ's clip: clamp each group to +-max_val (max_val shape [out, n_groups] or [out, n_groups, 1])."""
    if max_val is None:
        return x
    if max_val.numel() != x.shape[0]:
        raise QuantizationError(
            f"max_val has {max_val.numel()} entries but the weight has {x.shape[0]} groups"
        )
    mv = max_val.reshape(-1, 1).to(x.dtype)
    return torch.clamp(x, -mv, mv)


# ----------------------------------------------------------------------------- grid


def _range(x: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (row = one group) [lo, hi], widened to include 0; symmetric: [-absmax, absmax]."""
    if sym:
        a = x.abs().amax(dim=1, keepdim=True)
        return -a, a
    return x.amin(dim=1, keepdim=True).clamp_(max=0), x.amax(dim=1, keepdim=True).clamp_(min=0)


def _grid_of(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool,
             scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [n, 1] of the grid spanning [lo, hi] (lo <= 0 <= hi). scale_dtype: the
    scale is rounded to it first and the zero point chosen against the rounded scale."""
    if sym:
        scale = torch.maximum(hi, -lo).div_(2 ** (bits - 1) - 1).clamp_(min=MIN_SCALE)
    else:
        scale = (hi - lo).div_(2**bits - 1).clamp_(min=MIN_SCALE)
    if scale_dtype is not None:
        # scales are >= MIN_SCALE, which float16/bfloat16 still represent as nonzero
        scale = scale.to(scale_dtype).to(torch.float32)
    if sym:
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    return scale, torch.div(-lo, scale).round_().clamp_(0, 2**bits - 1)


def _grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (row = one group) min/max scale and zero, both shaped [n, 1] in x's dtype."""
    return _grid_of(*_range(x, sym), bits, sym)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes (still in x's float dtype): clamp(round(x/scale) + zero)."""
    return torch.div(x, scale).round_().add_(zero).clamp_(0, 2**bits - 1)


# ----------------------------------------------------------------------------- public API


def _result(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool,
            shape: tuple[int, int]) -> QuantizedWeight:
    """The QuantizedWeight of grouped x [out * n_groups, g] rounded onto per-group grids."""
    out_features, in_features = shape
    n_groups = in_features // x.shape[1]
    return QuantizedWeight(
        q=_codes(x, scale, zero, bits).to(torch.uint8).reshape(out_features, in_features),
        scales=scale.reshape(out_features, n_groups).contiguous(),
        zeros=zero.to(torch.uint8).reshape(out_features, n_groups).contiguous(),
        bits=bits,
        group_size=x.shape[1],
        sym=sym,
    )


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    sym: bool = False,
    max_val: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Group-wise round-to-nearest of w [out, in] onto a 2**bits grid.

    max_val: AWQ clip thresholds [out, n_groups]; weights are clamped to +-max_val first.
    scale_dtype: round scales to this dtype (e.g. float16, what AWQ checkpoints store) *before*
    choosing q, so the stored scales are the ones the codes were rounded against and the
    checkpoint round trip is exact.
    """
    check_bits(bits)
    x, _ = _grouped(w.detach().to(torch.float32), group_size)
    x = _clip(x, max_val)
    scale, zero = _grid_of(*_range(x, sym), bits, sym, scale_dtype)
    return _result(x, scale, zero, bits, sym, tuple(w.shape))


# Shrink factors of the min/max range tried by quantize_weight_searched: 1.0 (min/max) first, so
# the searched grid is never worse than min/max under the search's own error measure.
SHRINKS = tuple(1.0 - 0.02 * i for i in range(21))  # 1.00, 0.98, ..., 0.60


def quantize_weight_searched(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    sym: bool = False,
    importance: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    shrinks: tuple[float, ...] = SHRINKS,
) -> QuantizedWeight:
    """quantize_weight with each group's range shrunk by the factor in `shrinks` that minimizes
    the group's squared rounding error, weighted per input channel by `importance` [in] (GPTQ
    passes diag(H), the mean squared activation of each channel, so the error is the layer
    output's, not the weight's).

    Why: min/max spends grid steps on the one or two largest weights of a group; at 3 bits a
    slightly narrower range rounds the other 60 weights finer and clips the outliers by less
    than it saves (GPTQ's reference quantizer has the same search, unweighted, as its `mse`
    option). Same grid conventions, scale rounding and clip thresholds as quantize_weight."""
    check_bits(bits)
    x, g = _grouped(w.detach().to(torch.float32), group_size)
    out_features, in_features = w.shape
    x = _clip(x, max_val)
    if importance is None:
        imp = torch.ones(1, g)
    else:
        if importance.numel() != in_features:
            raise QuantizationError(f"importance has {importance.numel()} entries, the weight {in_features} inputs")
        imp = importance.detach().float().reshape(1, in_features // g, g).expand(out_features, -1, -1).reshape(-1, g)
    lo, hi = _range(x, sym)
    scale = zero = best = None
    for p in shrinks:
        s, z = _grid_of(lo * p, hi * p, bits, sym, scale_dtype)
        err = _codes(x, s, z, bits).sub_(z).mul_(s).sub_(x).square_().mul_(imp).sum(dim=1, keepdim=True)
        if best is None:
            scale, zero, best = s, z, err
            continue
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return _result(x, scale, zero, bits, sym, tuple(w.shape))


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    sym: bool = False,
    max_val: torch.Tensor | None = None,
) -> torch.Tensor:
    """quantize_weight + dequantize in w's own dtype, without building a QuantizedWeight.

    Used inside AWQ's scale/clip grid searches, so it works in place on one temporary and
    returns a new tensor of w's shape and dtype; w itself is untouched.
    """
    check_bits(bits)
    x, _ = _grouped(w.detach(), group_size)
    x = _clip(x, max_val)
    scale, zero = _grid(x, bits, sym)
    q = _codes(x, scale, zero, bits)
    return q.sub_(zero).mul_(scale).reshape(w.shape)


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes quantize_weight would give x on a grid already chosen (scale and zero broadcast
    against x), as floats: clamp(round(x / scale) + zero, 0, 2**bits - 1).

    GPTQ fixes a group's grid when it reaches the group's first column and rounds the later,
    error-compensated columns onto it, so it needs the rounding without the grid search."""
    return _codes(x, scale, zero, bits)


# ----------------------------------------------------------------------------- int32 packing


def packed_words(n: int, bits: int, order: PackOrder) -> int:
    """How many int32 words a row of n values takes in the given order."""
    if order == "dense":
        return math.ceil(n * bits / 32)
    if order == "awq":
        return math.ceil(n / 8)
    return math.ceil(n / (32 // bits))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits (two's complement)."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _as_unsigned(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.int32:
        raise QuantizationError(f"packed tensor must be int32, got {packed.dtype}")
    return packed.to(torch.int64) & 0xFFFFFFFF


def _check_order(bits: int, order: PackOrder) -> None:
    check_bits(bits)
    if order == "awq" and bits != 4:
        raise QuantizationError(f"the AWQ nibble order exists for 4 bits only, got {bits}")
    if order not in ("awq", "dense", "padded"):
        raise QuantizationError(f"unknown pack order {order!r}")


def pack_int32(values: torch.Tensor, bits: int, order: PackOrder = "dense") -> torch.Tensor:
    """Pack unsigned values [..., n] (each < 2**bits) along the last dim into int32 [..., words].

    Works one value slot at a time so the only wide temporaries are word-sized (a 4-bit
    checkpoint layer never gets an int64 copy of every value)."""
    _check_order(bits, order)
    if values.is_floating_point():
        raise QuantizationError(f"pack_int32 takes integer values, got {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise QuantizationError(f"values out of range for {bits}-bit packing")
    if order == "dense":
        return _pack_dense(values, bits)
    per_word = 8 if order == "awq" else 32 // bits
    v = _pad_last(values, packed_words(values.shape[-1], bits, order) * per_word)
    v = v.reshape(*v.shape[:-1], -1, per_word)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for slot in range(per_word):
        column = AWQ_ORDER[slot] if order == "awq" else slot
        words |= v[..., column].to(torch.int64) << (slot * bits)
    return _to_int32(words)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, order: PackOrder = "dense") -> torch.Tensor:
    """Inverse of pack_int32: int32 [..., words] -> uint8 [..., n]."""
    _check_order(bits, order)
    if packed.shape[-1] != packed_words(n, bits, order):
        raise QuantizationError(
            f"{packed.shape[-1]} packed words cannot hold {n} {bits}-bit values in {order!r} order "
            f"(expected {packed_words(n, bits, order)})"
        )
    u = _as_unsigned(packed)
    if order == "dense":
        return _unpack_dense(u, bits, n)
    per_word = 8 if order == "awq" else 32 // bits
    out = torch.empty(*u.shape, per_word, dtype=torch.uint8)
    for slot in range(per_word):
        column = AWQ_ORDER[slot] if order == "awq" else slot
        out[..., column] = ((u >> (slot * bits)) & (2**bits - 1)).to(torch.uint8)
    return out.reshape(*u.shape[:-1], -1)[..., :n].contiguous()


def _pad_last(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[-1]
    if pad <= 0:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:-1], pad)], dim=-1)


def _dense_layout(bits: int) -> tuple[list[int], list[int]]:
    """Word index and bit offset of each of the 32 values in one block of `bits` words."""
    starts = [i * bits for i in range(32)]
    return [s // 32 for s in starts], [s % 32 for s in starts]


def _pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    # 32 values fill exactly `bits` words, so work block by block of 32 values.
    n = values.shape[-1]
    v = _pad_last(values, math.ceil(n / 32) * 32)
    blocks = v.reshape(*v.shape[:-1], -1, 32)
    words = torch.zeros(*blocks.shape[:-1], bits, dtype=torch.int64)
    word_idx, offset = _dense_layout(bits)
    for i in range(32):
        val, w, off = blocks[..., i].to(torch.int64), word_idx[i], offset[i]
        words[..., w] |= (val << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles into the next word
            words[..., w + 1] |= val >> (32 - off)
    words = words.reshape(*v.shape[:-1], -1)[..., : packed_words(n, bits, "dense")]
    return _to_int32(words)


def _unpack_dense(u: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    u = _pad_last(u, math.ceil(u.shape[-1] / bits) * bits)
    blocks = u.reshape(*u.shape[:-1], -1, bits)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.uint8)
    word_idx, offset = _dense_layout(bits)
    mask = 2**bits - 1
    for i in range(32):
        w, off = word_idx[i], offset[i]
        val = blocks[..., w] >> off
        if off + bits > 32:
            val = val | (blocks[..., w + 1] << (32 - off))
        out[..., i] = (val & mask).to(torch.uint8)
    return out.reshape(*u.shape[:-1], -1)[..., :n].contiguous()
