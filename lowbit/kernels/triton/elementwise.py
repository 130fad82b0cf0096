"""Fused row ops for the GPU decode path: RMSNorm (with the residual add), SiLU-and-mul, rotary.

Each computes what lowbit's CPU reference computes (lowbit/kernels/ref.py), in the same order
and precision: RMSNorm normalises in fp32, casts to the activation dtype, then scales by the
weight (HF order); the residual add rounds to the residual's dtype first; SiLU rounds to the
activation dtype before the multiply (as F.silu(gate) * up does); rotary is the non-interleaved
("neox", rotate-half) form in fp32 with multiply and add kept separate (no FMA), so it matches
the CPU reference's rotate bit for bit. One program per row (token): these ops are bandwidth-bound and a
row of a 4096-wide model is one tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, n_cols, eps, s_x, s_r, s_o,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < n_cols
    x = tl.load(x_ptr + row * s_x + c, mask=m, other=0.0)
    if ADD:  # residual += x in the residual's dtype, then normalise the residual
        r = (tl.load(r_ptr + row * s_r + c, mask=m, other=0.0).to(tl.float32) + x.to(tl.float32))
        r = r.to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * s_r + c, r, mask=m)
        x = r
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    xn = (xf * tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))).to(x.dtype)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    tl.store(out_ptr + row * s_o + c, (w.to(tl.float32) * xn.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    if w.shape != (n,):
        raise ValueError(f"norm weight has shape {tuple(w.shape)}, rows have {n} columns")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(w.dtype, x.dtype), device=x.device)
    r2 = x2
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual and x must share shape and dtype")
        r2 = residual.view(-1, n)  # in place: must be a view
        if r2.stride(-1) != 1:
            raise ValueError("the residual must have a unit stride on its last dimension")
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, w, out, n, float(eps), x2.stride(0), r2.stride(0), out.stride(0),
            BLOCK=triton.next_power_of_2(n), ADD=residual is not None, enable_fp_fusion=False,
        )
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dimension; x is not modified."""
    return _norm(x, None, w, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place, then returns rms_norm(residual, w, eps)."""
    return _norm(x, residual, w, eps)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, s_x, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    g = tl.load(x_ptr + row * s_x + c, mask=m, other=0.0)
    u = tl.load(x_ptr + row * s_x + n + c, mask=m, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * s_o + c, (act.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up, [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    x2 = _rows(x)
    n = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(max(n, 1)))
    if x2.shape[0] and n:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, n, x2.stride(0), out.stride(0), BLOCK=block)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rotate_heads(ptr, s_h, n_heads, cos, sin, HP: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    hh = tl.arange(0, HP)
    d = tl.arange(0, HALF_P)
    m = (hh < n_heads)[:, None] & (d < HALF)[None, :]
    p = ptr + hh[:, None] * s_h + d[None, :]
    x1 = tl.load(p, mask=m, other=0.0)
    x2 = tl.load(p + HALF, mask=m, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p, (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=m)
    tl.store(p + HALF, (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=m)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cs_ptr, hq, hk, s_qn, s_qh, s_kn, s_kh, s_cs,
    HQ_P: tl.constexpr, HK_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
):
    n = tl.program_id(0)
    pos = tl.load(pos_ptr + n).to(tl.int64)
    d = tl.arange(0, HALF_P)
    dm = d < HALF
    cos = tl.load(cs_ptr + pos * s_cs + d, mask=dm, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + n * s_qn, s_qh, hq, cos, sin, HQ_P, HALF, HALF_P)
    _rotate_heads(k_ptr + n * s_kn, s_kh, hk, cos, sin, HK_P, HALF, HALF_P)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q [N, Hq, D] and k [N, Hkv, D] in place (neox / rotate-half); positions [N];
    cos_sin [P, D] = [cos | sin] per position (lowbit's RotaryEmbedding.cos_sin)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary_ takes q [N, Hq, D] and k [N, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    N, hq, D = q.shape
    if D % 2 or cos_sin.shape[-1] != D or positions.shape != (N,):
        raise ValueError(f"rotary_: head_dim {D} must be even and match cos_sin {tuple(cos_sin.shape)}; "
                         f"positions must be [{N}]")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin.stride(1) != 1:
        raise ValueError("rotary_ needs a unit stride on head_dim")
    if N == 0:
        return
    hk = k.shape[1]
    _rotary_kernel[(N,)](
        q, k, positions.contiguous(), cos_sin, hq, hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin.stride(0), HQ_P=triton.next_power_of_2(hq), HK_P=triton.next_power_of_2(hk), HALF=D // 2,
        HALF_P=triton.next_power_of_2(D // 2), enable_fp_fusion=False,
    )
