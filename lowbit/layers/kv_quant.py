"""The KV cache's quantization schemes: the one definition of how K/V codes map to values.

The paged pool (lowbit/engine/kv_cache.py) stores these codes, the fused decode kernel
(lowbit/layers/ops.py `paged_decode_attention`) reads them in place, and the evaluation reads
them back through the pool; all three must agree, so the math lives here, below all of them.

Both schemes are asymmetric, value = code * scale + zero, with min/max ranges:

* per token and head (int8 K and V, int4 V): scale = (max - min) / qmax over head_dim, fp32
  scale and zero stored as scale_zero [..., H, 2] (LMDeploy's scheme);
* per channel over a block's tokens (int4 K, KIVI's finding that keys have a few fixed outlier
  channels): fp16 (scale, zero) per block and channel, stored as [M, 2, H, D]; the codes are
  computed from the fp16-rounded range, so requantizing with an unchanged range is an identity.

int4 packs two values per byte: element j in the low nibble, element j + D/2 in the high one,
so unpacking is one concatenation.
"""
from __future__ import annotations

import torch

QMAX = {"int8": 255.0, "int4": 15.0}
MIN_SCALE = 2.0**-14  # smallest normal fp16: the stored scale never underflows
FP16_MAX = 65504.0


def quantize(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., H, D] fp32 -> (uint8 codes [..., H, D or D/2], scale_zero [..., H, 2]); asymmetric
    per token and head: scale = (max - min) / qmax, zero = min."""
    qmax = QMAX[dtype]
    x = x.float()
    mn, mx = x.aminmax(dim=-1)
    scale = (mx - mn).div_(qmax).clamp_min_(1e-8)
    q = (x - mn.unsqueeze(-1)).div_(scale.unsqueeze(-1)).round_().clamp_(0, qmax).to(torch.uint8)
    if dtype == "int4":
        q = pack4(q)
    return q, torch.stack([scale, mn], dim=-1)


def dequantize(q: torch.Tensor, scale_zero: torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of `quantize` for any leading shape: q [..., H, D or D/2], scale_zero [..., H, 2]."""
    if dtype == "int4":
        q = unpack4(q)
    x = q.float()
    return x.mul_(scale_zero[..., :1]).add_(scale_zero[..., 1:])  # in place: ~3x faster than addcmul here


def unpack4(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([q & 15, q >> 4], dim=-1)


def pack4(q: torch.Tensor) -> torch.Tensor:
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def channel_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (zero, scale) covering [lo, hi] with 15 steps; the scale is computed from the rounded
    zero so that code 15 still reaches hi."""
    zero = lo.clamp(-FP16_MAX, FP16_MAX).half()
    scale = (hi - zero.float()).div_(15.0).clamp_(MIN_SCALE, FP16_MAX).half()
    return zero, scale


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 per channel over the token axis: x [M, bs, H, D] fp32 -> (packed codes [M, bs, H, D/2],
    fp16 scale_zero [M, 2, H, D]). Codes are computed from the fp16-rounded scale and zero, so
    requantizing a dequantized block with an unchanged range gives back the same codes."""
    zero, scale = channel_range(*x.aminmax(dim=1))
    q = (x - zero.float().unsqueeze(1)).div_(scale.float().unsqueeze(1)).round_().clamp_(0, 15).to(torch.uint8)
    return pack4(q), torch.stack([scale, zero], dim=1)


def dequantize_channels(q: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_channels`: q [M, bs, H, D/2], scale_zero [M, 2, H, D] -> fp32 [M, bs, H, D]."""
    x = unpack4(q).float()
    sz = scale_zero.float()
    return x.mul_(sz[:, :1]).add_(sz[:, 1:])


def widen_channel_range(lo: torch.Tensor, hi: torch.Tensor, old_sz: torch.Tensor,
                        keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel [lo, hi] [M, H, D] widened to cover each block's stored range (old_sz fp32
    [M, 2, H, D] = (scale, zero)), only where `keep` [M] says the block's earlier rows stay
    (None: every block)."""
    s_old, z_old = old_sz[:, 0], old_sz[:, 1]
    if keep is None:
        return torch.minimum(lo, z_old), torch.maximum(hi, z_old + 15.0 * s_old)
    kp = keep[:, None, None]
    lo = torch.where(kp, torch.minimum(lo, z_old), lo)
    hi = torch.where(kp, torch.maximum(hi, z_old + 15.0 * s_old), hi)
    return lo, hi


def remap_channel_codes(packed: torch.Tensor, old_sz: torch.Tensor, zero: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """A block's int4 K codes [M, bs, H, D/2] under its old range (old_sz fp32 [M, 2, H, D]) moved
    onto the new fp16 grid (zero, scale [M, H, D]): an identity for every channel whose range did
    not grow, a re-rounding (at most half a new step) for one that did."""
    s_old, z_old = old_sz[:, 0], old_sz[:, 1]
    z, s = zero.float(), scale.float()
    mul, add = s_old / s, (z_old - z) / s
    codes = unpack4(packed).float().mul_(mul.unsqueeze(1)).add_(add.unsqueeze(1))
    return pack4(codes.round_().clamp_(0, 15).to(torch.uint8))


def quantize_to_channel_range(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed int4 codes of x [N, H, D] fp32 on a given per-channel grid (zero, scale fp32 [N, H, D])."""
    return pack4((x - zero).div_(scale).round_().clamp_(0, 15).to(torch.uint8))
