"""Paged decode attention: one new query token per sequence over its cached keys and values,
read in place through the block table, GQA, fp16/bf16/fp32 or int8/int4 KV.

The pool layout and quantization are the CPU pool's (lowbit/engine/kv_cache.py, schemes in
lowbit/layers/kv_quant.py), so one pool
format serves both devices: K/V [num_blocks, block_size, Hkv, D] floats, or uint8 codes with
value = code * scale + zero; int8: per token and head, sz fp32 [blocks, bs, Hkv, 2] = (scale,
zero); int4: codes [.., D/2], element j in the low nibble of byte j and j + D/2 in the high one;
V per token as int8, K per channel over each block's tokens with sz fp16 [blocks, 2, Hkv, D].

Every head is handled as two halves of D/2 (the int4 nibble split), so all dtypes share one code
path. A program owns one (sequence, kv head) and all the query heads of its group, so each
K/V tile is read once per group. Online softmax over the blocks, fp32 throughout. When batch x
kv heads is too small to fill the GPU, the block range is split (flash-decoding): each split
writes its running max, sum and accumulator, and torch combines them (deterministic). The split
count depends only on tensor shapes, so a captured CUDA graph stays valid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KV_CODES = {"fp32": 0, "fp16": 0, "bf16": 0, "int8": 1, "int4": 2}
_LOG2E = 1.4426950408889634


@triton.jit
def _load_token_quant(codes, sz_ptr, t_off, valid):
    """codes [BS, HALF_P] uint8 -> fp32 with per-token (scale, zero) at sz_ptr + t_off (+1)."""
    sc = tl.load(sz_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
    zr = tl.load(sz_ptr + t_off + 1, mask=valid, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * sc[:, None] + zr[:, None]


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, ksz_ptr, vsz_ptr, tab_ptr, lens_ptr, out_ptr, ml_ptr,
    scale_log2, window, stride_tab, blocks_per_split,
    s_qb, s_qh, s_pb, s_pt, s_ph, s_zb, s_zt, s_zh, s_cb, s_cw, s_ch, s_os, s_ob, s_oh,
    KV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HALF: tl.constexpr,
    HALF_P: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(lens_ptr + b)
    start = tl.where(window > 0, tl.maximum(L - window, 0), 0)  # first key kept (sliding window)
    first = start // BS
    last = (L + BS - 1) // BS
    if SPLITS > 1:
        lo_blk = first + sp * blocks_per_split
        hi_blk = tl.minimum(lo_blk + blocks_per_split, last)
    else:
        lo_blk = first
        hi_blk = last
    gh = tl.arange(0, GROUP_P)
    hmask = gh < GROUP
    heads = h * GROUP + gh
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    qmask = hmask[:, None] & dmask[None, :]
    qp = q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :]
    q_lo = tl.load(qp, mask=qmask, other=0.0).to(tl.float32) * scale_log2
    q_hi = tl.load(qp + HALF, mask=qmask, other=0.0).to(tl.float32) * scale_log2
    m_i = tl.full((GROUP_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_P,), dtype=tl.float32)
    acc_lo = tl.zeros((GROUP_P, HALF_P), dtype=tl.float32)
    acc_hi = tl.zeros((GROUP_P, HALF_P), dtype=tl.float32)
    t = tl.arange(0, BS)
    for bi in range(lo_blk, hi_blk):
        blk = tl.load(tab_ptr + b * stride_tab + bi).to(tl.int64)
        pos = bi * BS + t
        valid = (pos < L) & (pos >= start)
        lmask = valid[:, None] & dmask[None, :]
        off = blk * s_pb + t[:, None] * s_pt + h * s_ph + d[None, :]
        z_off = blk * s_zb + t * s_zt + h * s_zh
        if KV == 2:
            kc = tl.load(k_ptr + off, mask=lmask, other=0)
            cb = ksz_ptr + blk * s_cb + h * s_ch + d
            ks_lo = tl.load(cb, mask=dmask, other=0.0).to(tl.float32)
            ks_hi = tl.load(cb + HALF, mask=dmask, other=0.0).to(tl.float32)
            kz_lo = tl.load(cb + s_cw, mask=dmask, other=0.0).to(tl.float32)
            kz_hi = tl.load(cb + s_cw + HALF, mask=dmask, other=0.0).to(tl.float32)
            k_lo = (kc & 15).to(tl.float32) * ks_lo[None, :] + kz_lo[None, :]
            k_hi = (kc >> 4).to(tl.float32) * ks_hi[None, :] + kz_hi[None, :]
            vc = tl.load(v_ptr + off, mask=lmask, other=0)
            v_lo = _load_token_quant(vc & 15, vsz_ptr, z_off, valid)
            v_hi = _load_token_quant(vc >> 4, vsz_ptr, z_off, valid)
        elif KV == 1:
            k_lo = _load_token_quant(tl.load(k_ptr + off, mask=lmask, other=0), ksz_ptr, z_off, valid)
            k_hi = _load_token_quant(tl.load(k_ptr + off + HALF, mask=lmask, other=0), ksz_ptr, z_off, valid)
            v_lo = _load_token_quant(tl.load(v_ptr + off, mask=lmask, other=0), vsz_ptr, z_off, valid)
            v_hi = _load_token_quant(tl.load(v_ptr + off + HALF, mask=lmask, other=0), vsz_ptr, z_off, valid)
        else:
            k_lo = tl.load(k_ptr + off, mask=lmask, other=0.0).to(tl.float32)
            k_hi = tl.load(k_ptr + off + HALF, mask=lmask, other=0.0).to(tl.float32)
            v_lo = tl.load(v_ptr + off, mask=lmask, other=0.0).to(tl.float32)
            v_hi = tl.load(v_ptr + off + HALF, mask=lmask, other=0.0).to(tl.float32)
        s = tl.sum(q_lo[:, None, :] * k_lo[None, :, :], axis=2) + tl.sum(q_hi[:, None, :] * k_hi[None, :, :], axis=2)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_lo = acc_lo * alpha[:, None] + tl.sum(p[:, :, None] * v_lo[None, :, :], axis=1)
        acc_hi = acc_hi * alpha[:, None] + tl.sum(p[:, :, None] * v_hi[None, :, :], axis=1)
        m_i = m_new
    op = out_ptr + sp * s_os + b * s_ob + heads[:, None] * s_oh + d[None, :]
    if SPLITS > 1:  # partials: the combine step rescales by the running max
        tl.store(op, acc_lo, mask=qmask)
        tl.store(op + HALF, acc_hi, mask=qmask)
        mp = ml_ptr + ((sp * tl.num_programs(0) + b) * tl.num_programs(1) * GROUP + heads) * 2
        tl.store(mp, m_i, mask=hmask)
        tl.store(mp + 1, l_i, mask=hmask)
    else:
        tl.store(op, (acc_lo / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
        tl.store(op + HALF, (acc_hi / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Splits of the block range so that ~2 programs run per SM; each split keeps >= 4 blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = max(1, (2 * sms) // max(1, batch * kv_heads))
    return max(1, min(want, max_blocks // 4, 16))


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    k_sz: torch.Tensor | None = None,
    v_sz: torch.Tensor | None = None,
    kv_dtype: str = "fp16",
    splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D] in q's dtype. block_tables int32 [B, max_blocks]; context_lens
    int32 [B] (the new token's key included, already written); window > 0 keeps the last
    `window` keys. kv_dtype: fp32|fp16|bf16 (a float pool), int8 or int4 (see module doc)."""
    if kv_dtype not in KV_CODES:
        raise ValueError(f"kv_dtype must be one of {sorted(KV_CODES)}, got {kv_dtype!r}")
    B, Hq, D = q.shape
    nb, bs, Hkv = k_pool.shape[:3]
    code = KV_CODES[kv_dtype]
    if D % 2 or Hq % Hkv or bs & (bs - 1):
        raise ValueError(f"need an even head_dim, Hq % Hkv == 0 and a power-of-two block size; got D={D}, "
                         f"Hq={Hq}, Hkv={Hkv}, block_size={bs}")
    if k_pool.shape[3] != (D // 2 if code == 2 else D) or v_pool.shape != k_pool.shape:
        raise ValueError(f"pool shape {tuple(k_pool.shape)} does not match head_dim {D} for {kv_dtype}")
    if code and (k_sz is None or v_sz is None):
        raise ValueError(f"a {kv_dtype} pool needs k_sz and v_sz")
    if k_pool.stride(3) != 1 or q.stride(2) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, the pools and block_tables need a unit stride on their last dimension")
    if B == 0:
        return torch.empty_like(q)
    group = Hq // Hkv
    max_blocks = block_tables.shape[1]
    S = splits or choose_splits(B, Hkv, max_blocks, q.device)
    bps = triton.cdiv(max_blocks, S)
    if S > 1:
        out = torch.empty((S, B, Hq, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((S, B, Hq, 2), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty((1, B, Hq, D), dtype=q.dtype, device=q.device)
        ml = out  # unused
    dummy = k_pool.new_zeros(1)
    ksz, vsz = (k_sz, v_sz) if code else (dummy, dummy)
    tok_sz = vsz if code else dummy  # per-token strides: int8 K and V, int4 V
    s_zb, s_zt, s_zh = (tok_sz.stride(0), tok_sz.stride(1), tok_sz.stride(2)) if code else (0, 0, 0)
    if code == 1 and ksz.stride()[:3] != vsz.stride()[:3]:
        raise ValueError("int8 k_sz and v_sz must share a layout")
    s_cb, s_cw, s_ch = (ksz.stride(0), ksz.stride(1), ksz.stride(2)) if code == 2 else (0, 0, 0)
    _paged_decode_kernel[(B, Hkv, S)](
        q, k_pool, v_pool, ksz, vsz, block_tables, context_lens, out, ml,
        float(scale) * _LOG2E, int(window or 0), block_tables.stride(0), bps,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        s_zb, s_zt, s_zh, s_cb, s_cw, s_ch, out.stride(0), out.stride(1), out.stride(2),
        KV=code, GROUP=group, GROUP_P=_next_pow2(group), HALF=D // 2, HALF_P=_next_pow2(D // 2),
        BS=bs, SPLITS=S, num_warps=4,
    )
    if S == 1:
        return out[0]
    m, l = ml[..., 0], ml[..., 1]  # [S, B, Hq]; an empty split has m = -inf, l = 0
    w = torch.exp2(m - m.amax(0, keepdim=True))
    return ((out * w[..., None]).sum(0) / (l * w).sum(0)[..., None]).to(q.dtype)

