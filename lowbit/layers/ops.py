"""Fused decode-path ops: the compiled kernel the registry chose, or the pure-torch reference.

Why: a decode step of a small model is dominated by per-op dispatch, not arithmetic. Each function
here replaces a chain of small aten ops by one call into the compiled kernels (`kernels.OPS`, the
variant lowbit.kernels chose for this CPU; LOWBIT_ISA=ref forces the reference) when the inputs are
what the kernels handle (fp32 CPU tensors, unit stride on the last dimension); anything else takes
the reference (lowbit/kernels/ref.py), the same math as plain torch ops, so results agree to fp32
rounding either way.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..kernels import ref
from ..kernels.ref import rms_norm as rms_norm_ref, rotate as rotate_ref  # noqa: F401 - the references, by their old names

#: paged_decode_attention's kv_dtype codes (the pool's dtype name -> the kernel's element type).
KV_CODES = {"fp32": 0, "int8": 1, "int4": 2, "bf16": 3}


def _ext():
    return kernels.OPS.get()


def _fp32(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


# ----------------------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dimension; x is not modified."""
    ext = _ext()
    if ext is None or not _fp32(x, w) or x.dim() == 0 or x.numel() == 0:
        return ref.rms_norm(x, w, eps)
    n = x.shape[-1]
    return ext.rms_norm(x.reshape(-1, n), w, eps).view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place (the residual stream), then returns rms_norm(residual, w, eps)."""
    ext = _ext()
    if (
        ext is None or not _fp32(x, residual, w) or x.shape != residual.shape or x.numel() == 0
        or not residual.is_contiguous()
    ):
        return ref.fused_add_rms_norm(x, residual, w, eps)
    n = x.shape[-1]
    return ext.fused_add_rms_norm(x.reshape(-1, n), residual.view(-1, n), w, eps).view(x.shape)


# ----------------------------------------------------------------------------- MLP activation
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up, [..., I]."""
    ext = _ext()
    if ext is None or not _fp32(x) or x.numel() == 0 or x.shape[-1] % 2:
        return ref.silu_and_mul(x)
    n = x.shape[-1]
    return ext.silu_and_mul(x.reshape(-1, n)).view(*x.shape[:-1], n // 2)


# ----------------------------------------------------------------------------- rotary + KV write
def _flat_heads(t: torch.Tensor) -> torch.Tensor | None:
    """[..., H, D] as an [N, H, D] view (no copy: callers rotate in place), or None."""
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        return None


def _ext_rotary_ok(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    ext = _ext()
    if ext is None or not _fp32(q, k, cos_sin) or q.stride(-1) != 1 or k.stride(-1) != 1:
        return None, None, None
    qf, kf = _flat_heads(q), _flat_heads(k)
    if qf is None or kf is None or q.shape[-1] != cos_sin.shape[-1] or positions.dtype != torch.long:
        return None, None, None
    return ext, qf, kf


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q [..., Hq, D] and k [..., Hkv, D] in place; positions has their leading shape;
    cos_sin [P, D] = [cos | sin] per position (RotaryEmbedding.cos_sin)."""
    ext, qf, kf = _ext_rotary_ok(q, k, positions, cos_sin)
    if ext is not None:
        ext.rotary_(qf, kf, positions.reshape(-1).contiguous(), cos_sin)
        return
    ref.rotary_(q, k, positions, cos_sin)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    slots: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
) -> None:
    """rotary_(q, k) and store k, v [N, Hkv, D] at flat `slots` of fp32 or bf16 pools [blocks, bs, Hkv, D]."""
    ext, qf, kf = _ext_rotary_ok(q, k, positions, cos_sin)
    if (
        ext is not None and q.dim() == 3 and _fp32(v) and v.stride(-1) == 1
        and k_pool.dtype in (torch.float32, torch.bfloat16) and v_pool.dtype == k_pool.dtype
        and slots.dtype == torch.long and k_pool.is_contiguous() and v_pool.is_contiguous()
    ):
        ext.rotary_and_cache(qf, kf, v, positions.contiguous(), cos_sin, slots.contiguous(), k_pool, v_pool)
        return
    rotary_(q, k, positions, cos_sin)  # still the kernel where only the fused pool write is unsupported
    ref.store_kv(k, v, slots, k_pool, v_pool)


# ----------------------------------------------------------------------------- paged decode attention
def paged_decode_supported(head_dim: int, kv_dtype: str) -> bool:
    """Whether paged_decode_attention can run (extension built, head_dim a multiple of 8 (16 for
    int4), a known pool dtype); otherwise callers keep their gather + SDPA path."""
    if kv_dtype not in KV_CODES or head_dim % (16 if kv_dtype == "int4" else 8):
        return False
    return _ext() is not None


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
    kv_dtype: str = "fp32",
) -> torch.Tensor:
    """One new token per sequence attending to its cached keys/values, read from the blocks in place.

    q [B, Hq, D] fp32; pools [blocks, block_size, Hkv, D] fp32 or bf16, or uint8 codes in kv_cache.py's
    schemes (value = code * scale + zero): int8 [.., D] with k_sz/v_sz fp32 [blocks, block_size,
    Hkv, 2] per token; int4 [.., D/2] (element j in the low nibble of byte j, j + D/2 in the high
    one) with V per token as int8, K per channel over each block's tokens, k_sz fp16
    [blocks, 2, Hkv, D]. block_tables int32 [B, max_blocks]; context_lens int32 [B] (keys
    0..len-1, the new token's included); window > 0 keeps only the last `window` keys.
    Returns [B, Hq, D]. Call only where paged_decode_supported() says so (there is no torch
    fallback here: the caller's gather + SDPA path is the reference).
    """
    ext = _ext()
    if ext is None:
        raise RuntimeError("paged_decode_attention needs the lowbit ops extension")
    return ext.paged_decode_attention(
        q, k_pool, v_pool, k_sz, v_sz, block_tables, context_lens, float(scale), int(window or 0), KV_CODES[kv_dtype]
    )
