"""W4A16 / W8A16 matmul straight from the AutoAWQ GEMM packing (or the W8 layout), one kernel:

* M == 1 (decode, one sequence): a split-K GEMV on the CUDA cores. Each program streams a
  [BLOCK_K, BLOCK_N] tile of packed words once, unpacks the 8 nibbles of a word along a third
  axis (no repeated loads of a word, no reshape), and, with one group per K tile, folds the zero
  point and scale in after the dot product: sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn -
  z_n sum_k x_k), so the inner loop is shift, mask, convert, FMA. Bandwidth-bound: the weight
  bytes are the cost, and split-K gives enough programs to fill the GPU at small N.
* M > 1 (prefill, decode batches): the same tile, dequantized to the activation dtype and fed
  to tl.dot (tensor cores) against a [BLOCK_M, BLOCK_K] activation tile; split-K for small M.

Split-K partials go to an fp32 [split, M, N] buffer that torch sums: deterministic (no atomics),
so the same input gives the same output bits, run to run (greedy decoding depends on that).
Columns are computed in the packing's own order (word j, nibble i -> column 8j + AWQ_ORDER[i]):
scales, zeros and outputs are read and written at those columns, so nothing is repacked at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layouts import PackedWeight, from_awq


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _wq_matmul_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr,
    M, N, K, G, stride_xm, stride_om, stride_os,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    BN8: tl.constexpr = BLOCK_N // 8
    j = pid_n * BN8 + tl.arange(0, BN8)  # packed word column (8 output columns each)
    i = tl.arange(0, 8)
    shift = i * 4
    if BITS == 4:
        perm = (i % 4) * 2 + i // 4  # nibble i holds column AWQ_ORDER[i]
        row_words = N // 8
    else:
        perm = i
        row_words = N
    cols = j[:, None] * 8 + perm[None, :]  # [BN8, 8] output column of each unpacked value
    jmask = j < N // 8
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    if BLOCK_M == 1:
        acc = tl.zeros((BN8, 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        if BITS == 4:
            w = tl.load(qw_ptr + rk[:, None] * row_words + j[None, :], mask=kmask[:, None] & jmask[None, :], other=0)
            q = (w[:, :, None] >> shift[None, None, :]) & 15  # [BK, BN8, 8]
        else:
            q = tl.load(qw_ptr + rk[:, None, None] * row_words + cols[None, :, :],
                        mask=kmask[:, None, None] & jmask[None, :, None], other=0).to(tl.int32)
        if ONE_GROUP:  # the whole K tile lies in group k0 // G
            g = k0 // G
            if BITS == 4:
                zw = tl.load(qz_ptr + g * row_words + j, mask=jmask, other=0)
                z = (zw[:, None] >> shift[None, :]) & 15
            else:
                z = tl.load(qz_ptr + g * row_words + cols, mask=jmask[:, None], other=0).to(tl.int32)
            s = tl.load(s_ptr + g * N + cols, mask=jmask[:, None], other=0).to(tl.float32)
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + pid_m * stride_xm + rk, mask=kmask, other=0).to(tl.float32)
                t = tl.sum(xv[:, None, None] * q.to(tl.float32), axis=0)
                acc += s * (t - z.to(tl.float32) * tl.sum(xv, axis=0))
            else:
                wd = ((q - z[None, :, :]).to(tl.float32) * s[None, :, :]).to(x_ptr.dtype.element_ty)
                xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
                acc += tl.dot(xt, tl.reshape(wd, (BLOCK_K, BLOCK_N)))
        else:  # groups change inside the tile: zeros and scales per row
            g = rk // G
            gmask = kmask[:, None, None] & jmask[None, :, None]
            if BITS == 4:
                zw = tl.load(qz_ptr + g[:, None] * row_words + j[None, :], mask=kmask[:, None] & jmask[None, :], other=0)
                z = (zw[:, :, None] >> shift[None, None, :]) & 15
            else:
                z = tl.load(qz_ptr + g[:, None, None] * row_words + cols[None, :, :], mask=gmask, other=0).to(tl.int32)
            s = tl.load(s_ptr + g[:, None, None] * N + cols[None, :, :], mask=gmask, other=0).to(tl.float32)
            wf = (q - z).to(tl.float32) * s
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + pid_m * stride_xm + rk, mask=kmask, other=0).to(tl.float32)
                acc += tl.sum(xv[:, None, None] * wf, axis=0)
            else:
                xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
                acc += tl.dot(xt, tl.reshape(wf.to(x_ptr.dtype.element_ty), (BLOCK_K, BLOCK_N)))
    base = out_ptr + pid_k * stride_os
    if BLOCK_M == 1:
        tl.store(base + pid_m * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=jmask[:, None])
    else:
        c = tl.reshape(cols, (BLOCK_N,))
        tl.store(base + rm[:, None] * stride_om + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (c < N)[None, :])


def _pow2_divisor(g: int, cap: int) -> int:
    """The largest power of two <= cap that divides g."""
    b = 1
    while b * 2 <= cap and g % (b * 2) == 0:
        b *= 2
    return b


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs keep the tests fast


def choose_config(M: int, N: int, K: int, G: int, device: torch.device) -> GemmConfig:
    """A fixed heuristic (no autotuning, so a first call costs one compile): GEMV tiles of 128
    columns at M == 1, 16..64-row tensor-core tiles above; split K until the grid has ~4 programs
    per SM. benchmarks/gpu_bench.py sweeps alternatives on a real GPU."""
    if M == 1:
        bm, bn, bk_cap = 1, 128, 128
    elif M <= 16:
        bm, bn, bk_cap = 16, 64, 64
    elif M <= 32:
        bm, bn, bk_cap = 32, 64, 64
    else:
        bm, bn, bk_cap = 64, 128, 64
    bk = _pow2_divisor(G, bk_cap)
    if bk < 16:  # no usable divisor: per-row groups inside the tile
        bk = min(bk_cap, 32)
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    k_tiles = triton.cdiv(K, bk)
    split = 1
    while tiles * split < 4 * _num_sms(device) and split * 2 <= k_tiles and split < 16:
        split *= 2
    return GemmConfig(bm, bn, bk, split)


def quant_matmul(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                 config: GemmConfig | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K] fp16/bf16 and a PackedWeight; returns x's dtype."""
    K, N, G = pw.in_features, pw.out_features, pw.group_size
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quant_matmul takes fp16/bf16 activations (A16), got {x.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"activation has {x.shape[-1]} features, the weight expects {K}")
    if K * N >= 2**31:
        raise ValueError(f"weight {K}x{N} too large for 32-bit offsets")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    cfg = config or choose_config(M, N, K, G, x.device)
    one_group = G % cfg.block_k == 0
    out = torch.empty((cfg.split_k, M, N), dtype=torch.float32 if cfg.split_k > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), cfg.split_k)
    _wq_matmul_kernel[grid](
        x2, pw.qweight, pw.qzeros, pw.scales, out, M, N, K, G, x2.stride(0), out.stride(1), out.stride(0),
        BITS=pw.bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        ONE_GROUP=one_group, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    y = out[0] if cfg.split_k == 1 else out.sum(0).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], N)


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A16 on AutoAWQ GEMM checkpoint tensors as they are (see layouts.py)."""
    return quant_matmul(x, from_awq(qweight, qzeros, scales, group_size), bias)


def w8_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16 on the W8 layout (uint8 [K, N] codes, uint8 [K/G, N] zeros, fp16 [K/G, N] scales)."""
    if qweight.dtype != torch.uint8 or qzeros.dtype != torch.uint8:
        raise ValueError(f"W8 qweight/qzeros must be uint8, got {qweight.dtype}/{qzeros.dtype}")
    K = qweight.shape[0]
    g = K if group_size in (-1, 0) else group_size
    if g <= 0 or K % g or tuple(scales.shape) != (K // g, qweight.shape[1]) or qzeros.shape != scales.shape:
        raise ValueError(f"W8 shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)}, group {group_size}")
    if qweight.shape[1] % 8:
        raise ValueError(f"the W8 layout needs out_features divisible by 8, got {qweight.shape[1]}")
    return quant_matmul(x, PackedWeight(8, qweight, qzeros, scales, g), bias)
