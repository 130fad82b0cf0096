"""The KV write that quantizes on store, into the CPU pool's layout (lowbit/engine/kv_cache.py; the
schemes are defined in lowbit/layers/kv_quant.py).

* float pool (fp32/fp16/bf16): a cast and a store per token.
* int8, and int4 V: per token and head, scale = (max - min) / qmax (>= 1e-8), zero = min,
  code = round((x - min) / scale) clamped; int4 packs element j low, j + D/2 high.
* int4 K: per channel over each block's tokens, fp16 (scale, zero) per block. A write widens
  each touched block's ranges to cover its new tokens (from the stored ranges when the block's
  first new row is > 0, i.e. it holds earlier rows), remaps the block's other rows onto the new
  grid and quantizes the new rows; a block whose first new row is 0 starts afresh.

The arithmetic is the CPU pool's, step for step (correctly rounded division, round half to even,
multiply and add not fused into an FMA), so on the same fp32 inputs the codes and scales come
out bit-identical to KVCachePool.write; the tests check that.

int4 K needs each block's new tokens as consecutive rows with consecutive offsets (what an
engine step writes: a run of positions per sequence). `one_token_per_block=True` (a decode step:
one token per sequence, sequences never share a block they write) skips the host-side check
that costs a device sync, which keeps the write capturable in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MODES = {"fp32": 0, "fp16": 0, "bf16": 0, "int8": 1, "int4": 2}
_MIN_SCALE = 2.0**-14
_FP16_MAX = 65504.0


@triton.jit
def _rint(x):
    """Round half to even (torch.round), exactly, without libdevice (the interpreter lacks it)."""
    fl = tl.floor(x)
    f = x - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), fl + 1.0, fl)


@triton.jit
def _store_token(x_ptr, dst_ptr, sz_ptr, d, dmask, HALF: tl.constexpr, MODE: tl.constexpr):
    lo = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    hi = tl.load(x_ptr + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if MODE == 0:
        tl.store(dst_ptr + d, lo.to(dst_ptr.dtype.element_ty), mask=dmask)
        tl.store(dst_ptr + HALF + d, hi.to(dst_ptr.dtype.element_ty), mask=dmask)
    else:
        if MODE == 1:
            qmax = 255.0
        else:
            qmax = 15.0
        mn = tl.minimum(tl.min(tl.where(dmask, lo, float("inf")), 0), tl.min(tl.where(dmask, hi, float("inf")), 0))
        mx = tl.maximum(tl.max(tl.where(dmask, lo, float("-inf")), 0), tl.max(tl.where(dmask, hi, float("-inf")), 0))
        scale = tl.maximum(tl.math.div_rn(mx - mn, qmax), 1e-8)
        q_lo = tl.minimum(tl.maximum(_rint(tl.math.div_rn(lo - mn, scale)), 0.0), qmax).to(tl.uint8)
        q_hi = tl.minimum(tl.maximum(_rint(tl.math.div_rn(hi - mn, scale)), 0.0), qmax).to(tl.uint8)
        if MODE == 1:
            tl.store(dst_ptr + d, q_lo, mask=dmask)
            tl.store(dst_ptr + HALF + d, q_hi, mask=dmask)
        else:
            tl.store(dst_ptr + d, q_lo | (q_hi << 4), mask=dmask)
        tl.store(sz_ptr, scale)
        tl.store(sz_ptr + 1, mn)


@triton.jit
def _write_tokens_kernel(
    k_ptr, v_ptr, slots_ptr, kp_ptr, vp_ptr, ksz_ptr, vsz_ptr,
    s_kn, s_kh, s_vn, s_vh, s_pb, s_pt, s_ph, s_zb, s_zt, s_zh,
    BS: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, MODE: tl.constexpr, DO_K: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + n)
    blk = slot // BS
    off = slot % BS
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    dst = blk * s_pb + off * s_pt + h * s_ph
    zdst = blk * s_zb + off * s_zt + h * s_zh
    if DO_K:
        _store_token(k_ptr + n * s_kn + h * s_kh, kp_ptr + dst, ksz_ptr + zdst, d, dmask, HALF, MODE)
    _store_token(v_ptr + n * s_vn + h * s_vh, vp_ptr + dst, vsz_ptr + zdst, d, dmask, HALF, MODE)


@triton.jit
def _channel_half(x, new, keep, old_s, old_z, codes):
    """One half of D for int4 per-channel K: x [BS, HALF_P] new rows (fp32), codes [BS, HALF_P]
    the block's stored codes of this half. Returns (new codes [BS, HALF_P], scale, zero fp16)."""
    lo = tl.min(tl.where(new[:, None], x, float("inf")), 0)
    hi = tl.max(tl.where(new[:, None], x, float("-inf")), 0)
    lo = tl.where(keep, tl.minimum(lo, old_z), lo)
    hi = tl.where(keep, tl.maximum(hi, old_z + 15.0 * old_s), hi)
    zero = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16)
    z = zero.to(tl.float32)
    scale = tl.minimum(tl.maximum(tl.math.div_rn(hi - z, 15.0), 6.103515625e-05), 65504.0).to(tl.float16)
    s = scale.to(tl.float32)
    mul = tl.math.div_rn(old_s, s)
    add = tl.math.div_rn(old_z - z, s)
    remapped = _rint(codes.to(tl.float32) * mul[None, :] + add[None, :])
    fresh = _rint(tl.math.div_rn(x - z[None, :], s[None, :]))
    q = tl.where(new[:, None], fresh, remapped)
    return tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.uint8), scale, zero


@triton.jit
def _write_channel_k_kernel(
    k_ptr, seg_ptr, kp_ptr, ksz_ptr,
    s_kn, s_kh, s_pb, s_pt, s_ph, s_cb, s_cw, s_ch,
    BS: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
):
    sg = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.load(seg_ptr + sg * 4).to(tl.int64)
    first = tl.load(seg_ptr + sg * 4 + 1)
    row = tl.load(seg_ptr + sg * 4 + 2)
    count = tl.load(seg_ptr + sg * 4 + 3)
    t = tl.arange(0, BS)
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    new = (t >= first) & (t < first + count)
    # keep (the block holds earlier rows) as vectors: scalar-and-vector masks trip the interpreter
    keep_d = (d * 0 + first) > 0
    keep_t = (t * 0 + first) > 0
    kmask = dmask & keep_d
    xm = new[:, None] & dmask[None, :]
    xp = k_ptr + (row + t - first)[:, None].to(tl.int64) * s_kn + h * s_kh + d[None, :]
    x_lo = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
    x_hi = tl.load(xp + HALF, mask=xm, other=0.0).to(tl.float32)
    cp = ksz_ptr + blk * s_cb + h * s_ch + d
    os_lo = tl.load(cp, mask=kmask, other=0.0).to(tl.float32)
    os_hi = tl.load(cp + HALF, mask=kmask, other=0.0).to(tl.float32)
    oz_lo = tl.load(cp + s_cw, mask=kmask, other=0.0).to(tl.float32)
    oz_hi = tl.load(cp + s_cw + HALF, mask=kmask, other=0.0).to(tl.float32)
    pp = kp_ptr + blk * s_pb + t[:, None] * s_pt + h * s_ph + d[None, :]
    old = tl.load(pp, mask=dmask[None, :], other=0)
    q_lo, sc_lo, zr_lo = _channel_half(x_lo, new, keep_d, os_lo, oz_lo, old & 15)
    q_hi, sc_hi, zr_hi = _channel_half(x_hi, new, keep_d, os_hi, oz_hi, old >> 4)
    tl.store(pp, q_lo | (q_hi << 4), mask=(new | keep_t)[:, None] & dmask[None, :])
    tl.store(cp, sc_lo, mask=dmask)
    tl.store(cp + HALF, sc_hi, mask=dmask)
    tl.store(cp + s_cw, zr_lo, mask=dmask)
    tl.store(cp + s_cw + HALF, zr_hi, mask=dmask)


def _segments(slots: torch.Tensor, bs: int, one_token_per_block: bool) -> torch.Tensor:
    """int32 [S, 4] = (block, first offset, first row, count) per run of a block's new tokens."""
    n = slots.numel()
    blocks, offs = slots // bs, slots % bs
    if one_token_per_block:
        rows = torch.arange(n, device=slots.device)
        return torch.stack([blocks, offs, rows, torch.ones_like(rows)], 1).to(torch.int32).contiguous()
    brk = torch.ones(n, dtype=torch.bool, device=slots.device)
    brk[1:] = (blocks[1:] != blocks[:-1]) | (offs[1:] != offs[:-1] + 1)
    starts = brk.nonzero().squeeze(1)
    counts = torch.diff(starts, append=torch.tensor([n], device=slots.device))
    seg_blocks = blocks[starts]
    if torch.unique(seg_blocks).numel() != seg_blocks.numel():
        raise ValueError("int4 KV write: each block's new tokens must be consecutive rows at consecutive offsets")
    return torch.stack([seg_blocks, offs[starts], starts, counts], 1).to(torch.int32).contiguous()


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_sz: torch.Tensor | None = None,
    v_sz: torch.Tensor | None = None,
    kv_dtype: str = "fp16",
    one_token_per_block: bool = False,
) -> None:
    """Store k, v [N, Hkv, D] at flat slots (block * block_size + offset) of the pools, quantized
    per kv_dtype (fp32|fp16|bf16|int8|int4); scale/zero tensors as in kv_cache.py."""
    if kv_dtype not in _MODES:
        raise ValueError(f"kv_dtype must be one of {sorted(_MODES)}, got {kv_dtype!r}")
    mode = _MODES[kv_dtype]
    N, H, D = k.shape
    nb, bs = k_pool.shape[:2]
    if v.shape != k.shape or slots.shape != (N,) or D % 2 or k_pool.shape[2] != H:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)}, slots {tuple(slots.shape)} and pool "
                         f"{tuple(k_pool.shape)} disagree (head_dim must be even)")
    if k_pool.shape[3] != (D // 2 if mode == 2 else D) or v_pool.shape != k_pool.shape:
        raise ValueError(f"pool shape {tuple(k_pool.shape)} does not hold head_dim {D} as {kv_dtype}")
    if mode and (k_sz is None or v_sz is None):
        raise ValueError(f"a {kv_dtype} pool needs k_sz and v_sz")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_pool.stride(3) != 1 or v_pool.stride() != k_pool.stride():
        raise ValueError("k, v and the pools need a unit stride on head_dim and the pools one layout")
    if N == 0:
        return
    slots = slots.to(torch.int64).contiguous()
    half, half_p = D // 2, triton.next_power_of_2(D // 2)
    dummy = k_pool.new_zeros(1)
    ksz, vsz = (k_sz, v_sz) if mode else (dummy, dummy)
    zs = (vsz.stride(0), vsz.stride(1), vsz.stride(2)) if mode else (0, 0, 0)
    if mode == 1 and ksz.stride() != vsz.stride():
        raise ValueError("int8 k_sz and v_sz must share a layout")
    _write_tokens_kernel[(N, H)](
        k, v, slots, k_pool, v_pool, ksz, vsz, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), *zs,
        BS=bs, HALF=half, HALF_P=half_p, MODE=mode, DO_K=mode != 2, enable_fp_fusion=False,
    )
    if mode == 2:
        seg = _segments(slots, bs, one_token_per_block)
        _write_channel_k_kernel[(seg.shape[0], H)](
            k, seg, k_pool, k_sz, k.stride(0), k.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            k_sz.stride(0), k_sz.stride(1), k_sz.stride(2), BS=bs, HALF=half, HALF_P=half_p, enable_fp_fusion=False,
        )
