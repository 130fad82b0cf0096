"""Pure-torch references for the triton kernels (the tests' ground truth), written for clarity.

The elementwise ops (RMSNorm, SiLU-and-mul, rotary) and the KV pool's quantizing write already
have CPU references in lowbit (lowbit/kernels/ref.py; lowbit/engine/kv_cache.py over
lowbit/layers/kv_quant.py); the tests use those, so the triton kernels are held to the CPU
engine's own math. What lowbit has no torch form of in the GPU layouts lives here. (This package
imports nothing from lowbit outside lowbit/kernels, so these are written out, not imported.)
"""
from __future__ import annotations

import torch

from .layouts import AWQ_ORDER, PackedWeight


def unpack_codes(pw: PackedWeight, which: str = "qweight") -> torch.Tensor:
    """The codes of qweight or qzeros as int64 [rows, N] in natural column order."""
    t = getattr(pw, which)
    if pw.bits == 8:
        return t.to(torch.int64)
    r, n8 = t.shape
    shifts = torch.arange(0, 32, 4, device=t.device)
    nib = (t.to(torch.int64)[:, :, None] >> shifts) & 15  # [r, n8, slot]
    cols = torch.empty_like(nib)
    cols[:, :, list(AWQ_ORDER)] = nib  # slot i holds column AWQ_ORDER[i]
    return cols.reshape(r, n8 * 8)


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """fp32 W^T [K, N] = (q - zero) * scale."""
    q, z = unpack_codes(pw, "qweight"), unpack_codes(pw, "qzeros")
    g = pw.group_size
    z = z.repeat_interleave(g, dim=0)
    s = pw.scales.float().repeat_interleave(g, dim=0)
    return (q - z).float() * s


def quant_matmul_ref(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, accumulated in fp32."""
    y = x.float() @ dequantize(pw)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequantize_blocks(codes: torch.Tensor, sz: torch.Tensor | None, kv_dtype: str, channel: bool = False) -> torch.Tensor:
    """Pool blocks [M, bs, H, D or D/2] -> fp32 [M, bs, H, D] (lowbit/layers/kv_quant.py's schemes).

    Per token (int8, int4 V): sz [M, bs, H, 2] = (scale, zero). Per channel (int4 K): sz
    [M, 2, H, D] fp16. int4 keeps element j in the low nibble of byte j, j + D/2 in the high one.
    """
    if kv_dtype in ("fp32", "fp16", "bf16"):
        return codes.float()
    x = torch.cat([codes & 15, codes >> 4], dim=-1) if kv_dtype == "int4" else codes
    x = x.float()
    if channel:
        szf = sz.float()
        return x * szf[:, :1] + szf[:, 1:]
    return x * sz[..., :1].float() + sz[..., 1:].float()


def paged_decode_attention_ref(
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
) -> torch.Tensor:
    """Softmax attention of q [B, Hq, D] over each sequence's first len keys (last `window` of
    them when window > 0), GQA by repeating kv heads; fp32 math, result in q's dtype."""
    B, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, : (n + bs - 1) // bs].long()
        ksz = k_sz.index_select(0, blocks) if k_sz is not None else None
        vsz = v_sz.index_select(0, blocks) if v_sz is not None else None
        k = dequantize_blocks(k_pool.index_select(0, blocks), ksz, kv_dtype, channel=kv_dtype == "int4")
        v = dequantize_blocks(v_pool.index_select(0, blocks), vsz, kv_dtype)
        k, v = k.flatten(0, 1)[:n], v.flatten(0, 1)[:n]
        if window:
            k, v = k[max(0, n - window) :], v[max(0, n - window) :]
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
        w = torch.einsum("hd,nhd->hn", q[b].float(), k).mul(scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", w, v)
    return out.to(q.dtype)


def greedy_ref(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, the first of tied maxima (lowbit's CPU greedy_tokens computes the same)."""
    return logits.float().argmax(dim=-1)
