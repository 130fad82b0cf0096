"""The pure-torch reference implementations (`ref`) of the fused decode ops.

They are the math the compiled kernels reproduce, written out as plain tensor ops: the registry's
choice when no compiled variant is usable (or LOWBIT_ISA=ref), and the path lowbit/layers/ops.py
takes for inputs the kernels do not handle (other dtypes, non-CPU tensors, odd strides). Any
shape with the documented trailing dimensions is accepted.

Ops whose reference lives with its data instead: the quantized linear (QuantLinear's own dequant +
matmul in lowbit/layers/linear.py), the quantized KV write (engine/kv_cache.py quantize + index
copies), and paged decode attention (the gather + SDPA path in lowbit/layers/paged_attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in HF order: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place, then rms_norm(residual)."""
    residual.add_(x)
    return rms_norm(residual, w, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up, [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary of x [..., H, D] with cos/sin [..., 1, D/2] (out of place)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q [..., Hq, D] and k [..., Hkv, D] in place; cos_sin [P, D] = [cos | sin] per position."""
    cos, sin = cos_sin[positions].unsqueeze(-2).chunk(2, dim=-1)
    q.copy_(rotate(q, cos, sin))
    k.copy_(rotate(k, cos, sin))


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
    """rotary_(q, k), then k, v [N, Hkv, D] stored at flat `slots` of pools [blocks, bs, Hkv, D]."""
    rotary_(q, k, positions, cos_sin)
    store_kv(k, v, slots, k_pool, v_pool)


def store_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    """k, v [N, Hkv, D] stored at flat `slots` of pools [blocks, bs, Hkv, D]."""
    k_pool.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_pool.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
