"""The weight layouts the triton GEMM/GEMV kernels read, and packers into them (pure torch).

W4 ("awq"): AutoAWQ's WQLinear_GEMM buffers, read as they are in the checkpoint:
    qweight int32 [K, N/8]   word j of row k holds columns 8j..8j+7; nibble i (bits 4i..4i+3)
                             holds column 8j + AWQ_ORDER[i], AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
    qzeros  int32 [K/G, N/8] packed the same way
    scales  fp16  [K/G, N]
    W[n, k] = (q[k, n] - zero[k // G, n]) * scale[k // G, n]
3-bit weights (codes 0..7) are stored in this 4-bit container unchanged: exact, but the kernel
then streams 4 bits a weight (no dense 3-bit packing is implemented).

W8 ("w8"): the same orientation, one byte a value, nothing to unpack:
    qweight uint8 [K, N], qzeros uint8 [K/G, N], scales fp16 [K/G, N]; same formula.

K is the input (reduction) dimension, N the output one; G the group size (G == K: per channel).
Packers take codes the way lowbit's QuantizedWeight holds them (uint8 [N, K], scales/zeros
[N, K/G]) as plain tensors, so this package does not depend on lowbit.quant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class PackedWeight:
    """One linear's quantized weight in a layout above; `bits` is 4 (awq) or 8 (w8)."""

    bits: int
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes a matmul streams: codes, zeros and scales."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales))


def _check_group(k: int, group_size: int) -> int:
    g = k if group_size in (-1, 0) else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group size {group_size} does not divide in_features={k}")
    return g


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> PackedWeight:
    """Checkpoint tensors (AutoAWQ GEMM) -> PackedWeight, shapes and dtypes checked."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"AWQ scales must be floating, got {scales.dtype}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = _check_group(k, group_size)
    want = {"qzeros": (k // g, n // 8), "scales": (k // g, n)}
    for name, t in (("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"AWQ {name} has shape {tuple(t.shape)}, expected {want[name]} (K={k}, N={n}, G={g})")
    return PackedWeight(4, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g)


def _check_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, qmax: int) -> int:
    if q.dim() != 2:
        raise ValueError(f"codes must be [out, in], got shape {tuple(q.shape)}")
    n, k = q.shape
    g = _check_group(k, group_size)
    if tuple(scales.shape) != (n, k // g) or tuple(zeros.shape) != (n, k // g):
        raise ValueError(f"scales/zeros must be {(n, k // g)}, got {tuple(scales.shape)}/{tuple(zeros.shape)}")
    if int(q.max()) > qmax or int(zeros.max()) > qmax or int(q.min()) < 0 or int(zeros.min()) < 0:
        raise ValueError(f"codes and zeros must lie in [0, {qmax}]")
    return g


def _pack_awq_words(v: torch.Tensor) -> torch.Tensor:
    """uint8 [R, N] (values < 16, N % 8 == 0) -> int32 [R, N/8] in AWQ nibble order."""
    r, n = v.shape
    cols = v.to(torch.int64).view(r, n // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    words = (cols << shifts).sum(-1)  # disjoint bits: the sum is the OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_awq4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> PackedWeight:
    """Codes uint8 [N, K] (4-bit, or 3-bit in the 4-bit container), scales/zeros [N, K/G] -> W4."""
    g = _check_codes(q, scales, zeros, group_size, 15)
    if q.shape[0] % 8:
        raise ValueError(f"the AWQ layout needs out_features divisible by 8, got {q.shape[0]}")
    return PackedWeight(
        4,
        _pack_awq_words(q.t().contiguous()),
        _pack_awq_words(zeros.t().contiguous()),
        scales.t().to(torch.float16).contiguous(),
        g,
    )


def pack_w8(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> PackedWeight:
    """Codes uint8 [N, K] (up to 8 bits), scales/zeros [N, K/G] -> the W8 layout."""
    g = _check_codes(q, scales, zeros, group_size, 255)
    if q.shape[0] % 8:
        raise ValueError(f"the W8 layout needs out_features divisible by 8, got {q.shape[0]}")
    return PackedWeight(
        8,
        q.t().to(torch.uint8).contiguous(),
        zeros.t().to(torch.uint8).contiguous(),
        scales.t().to(torch.float16).contiguous(),
        g,
    )
