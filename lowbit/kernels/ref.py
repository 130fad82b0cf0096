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
    """k, v [N, Hkv, D] stored at flat `slots` of pools [blocks, bs, Hkv, D] (rounded to the pools' dtype)."""
    k_pool.view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(k_pool.dtype))
    v_pool.view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(v_pool.dtype))


# ----------------------------------------------------------------------------- int8 activations
# The layouts (panels of 16 output channels) are described in csrc/qgemm/int8.h; the packers are
# in lowbit/layers/linear_int8.py. The integer products here run in float64, exact for any K we meet.
PANEL = 16


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q int8 [..., K], scale float32 [...]): scale = max|x| / 127, q = round-half-even
    of x * (127 / max|x|) (a zero row: scale 0, q 0; a row with NaN or Inf: scale NaN, q 0). True
    divisions, as the kernel computes them."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    finite = torch.isfinite(xf).all(-1)
    amax = torch.where(finite, amax, torch.full_like(amax, float("nan")))  # a non-finite row: NaN scale, codes 0
    inv = torch.where(finite & (amax > 0), torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(torch.nan_to_num(xf * inv.unsqueeze(-1), nan=0.0)).clamp_(-127, 127).to(torch.int8)
    return q, amax / torch.full_like(amax, 127.0)


def unpack_w8(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """int8 [P, Kp/4, 16, 4] -> int8 [N, Kp]."""
    p, t = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(p * PANEL, t * 4)[:out_features]


def unpack_w4(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 [P, Kp/8, 64] -> uint8 codes [N, Kp]."""
    p, t = packed.shape[:2]
    b = packed.view(p, t, PANEL, 4)
    codes = torch.cat([b & 0xF, b >> 4], dim=-1)  # [P, T, 16, 8]: k = 8t + (0..3 low, 4..7 high)
    return codes.permute(0, 2, 1, 3).reshape(p * PANEL, t * 8)[:out_features]


def _quantized_rows(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, xs = quantize_per_token(x.reshape(-1, x.shape[-1]))
    return F.pad(q, (0, kp - q.shape[1])), xs


def w8a8_linear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, rowsum: torch.Tensor,
                bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The W8A8 kernel's math: ((x_q . w) * x_scale) * w_scale + bias, returned in x's dtype."""
    del rowsum  # only the VNNI kernel needs it (its +128 correction)
    w = unpack_w8(packed, out_features)
    q, xs = _quantized_rows(x, w.shape[1])
    acc = (q.double() @ w.double().t()).float()
    y = acc * xs.unsqueeze(1) * w_scale[:out_features]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


def w4a8_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_scales: torch.Tensor,
                bias: torch.Tensor | None, out_features: int, group: int) -> torch.Tensor:
    """The W4A8 kernel's math: x quantized per token and per weight group (one scale each),
    sum_g x_scale_g (s (x_q . q)_g - z s sum_g x_q) + bias."""
    codes = unpack_w4(packed, out_features)
    n, kp = codes.shape
    ng = kp // group
    x2 = F.pad(x.reshape(-1, x.shape[-1]).float(), (0, kp - x.shape[-1]))
    q, xs = quantize_per_token(x2.view(-1, ng, group))  # [M, ng, group], [M, ng]: per token and group
    dots = torch.einsum("mgk,ngk->mng", q.double(), codes.double().view(n, ng, group))
    xsum = q.double().sum(-1)  # [M, ng]
    s = scales.permute(0, 2, 1).reshape(-1, ng)[:n].double()
    zs = zero_scales.permute(0, 2, 1).reshape(-1, ng)[:n].double()
    y = ((dots * s - xsum.unsqueeze(1) * zs) * xs.double().unsqueeze(1)).sum(-1).float()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ w^T (+ bias) for a bfloat16 w [N, K]: bf16 operands, fp32 result (the compiled
    kernel's gemv keeps x in fp32 at small M, so the two agree to bf16 rounding of x, not exactly)."""
    y = F.linear(x.to(torch.bfloat16), w).to(torch.float32)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
