"""The preallocated paged KV pool: per layer, K and V as [num_blocks, block_size, Hkv, D].

fp32 stores activations as they are. bf16 rounds them to bfloat16 (to nearest even), the default
under `dtype bfloat16` as vLLM's `kv_cache_dtype auto` follows the model dtype: half fp32's bytes,
so a batched decode step, whose attention streams the whole cache, reads half as much; no scales.
The quantized pools are asymmetric (code * scale + zero) with min/max ranges:

* int8: K and V per token and head (LMDeploy's scheme: min/max over head_dim, fp32 scale + zero).
  WikiText-2 perplexity of the default model moves by ~0.1% (benchmarks/kv_cache_ppl.py).
* int4: V per token and head as int8 does; K per *channel* over the tokens of each block (KIVI's
  finding: keys have a few fixed outlier channels with a large, steady offset, so one range per
  token is dominated by them and 4 bits leave ~1 level for everything else; a range per channel
  over a block's tokens follows each channel's own spread). Per-token K costs the default model
  ~+14% perplexity; per-channel K brings int4 to ~+1.5%. The block's K ranges are fp16 [2, Hkv, D]
  per block (scale, zero), i.e. 4 * D / block_size bytes per token and head.
  Tokens arrive one at a time in decode, so a block's K ranges are not known up front: a write
  widens each touched block's ranges to cover its new tokens (from the stored ranges, so rows a
  previous owner left past the last valid one never count) and remaps the block's earlier codes
  onto the new grid: an identity for every channel whose range did not grow, a re-rounding (at
  most half a new step) for one that did. A write at row 0 starts the block afresh. Whole blocks
  written at once (a long prefill) are quantized in one shot; on the default model, token-by-token
  filling costs ~+0.3% perplexity more than that (lowbit/eval/kv_perplexity.py).

The codes' math (quantize, dequantize, the per-channel grid and its remap) lives in
lowbit/layers/kv_quant.py, where the fused decode kernel's callers see it too; this file is the
pool: its tensors, which blocks a write touches, and reading blocks back.

Capacity vs fp32 (default model, head_dim 64, block 16): bf16 2x, int8 3.56x, int4 5.82x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .. import kernels
from ..layers import kv_quant
from ..kernels import ref
from .args import KV_CACHE_DTYPES

KV_DTYPES = tuple(d for d in KV_CACHE_DTYPES if d != "auto")
_FLOAT_POOL = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # fp32 | bf16 | int8 | int4

    @property
    def quantized(self) -> bool:
        """Codes with scales and zeros (int8, int4), rather than the values themselves (fp32, bf16)."""
        return self.dtype not in _FLOAT_POOL

    @property
    def torch_dtype(self) -> torch.dtype:
        """The pool tensors' element type."""
        return _FLOAT_POOL.get(self.dtype, torch.uint8)

    @property
    def channel_keys(self) -> bool:
        """K quantized per channel over each block's tokens (int4) rather than per token."""
        return self.dtype == "int4"

    @property
    def k_bytes_per_block_head(self) -> int:
        """Bytes one block's K takes for one kv head, scales included."""
        bs, D = self.block_size, self.head_dim
        if not self.quantized:
            return bs * D * self.torch_dtype.itemsize
        if self.dtype == "int8":
            return bs * (D + 8)  # fp32 scale + fp32 zero per token
        return bs * D // 2 + 2 * 2 * D  # fp16 scale + fp16 zero per channel

    @property
    def v_bytes_per_block_head(self) -> int:
        bs, D = self.block_size, self.head_dim
        if not self.quantized:
            return bs * D * self.torch_dtype.itemsize
        return bs * ((D if self.dtype == "int8" else D // 2) + 8)  # fp32 scale + zero per token

    @property
    def bytes_per_token_head(self) -> float:
        """Mean bytes one token's K or V takes for one head, scales included."""
        return (self.k_bytes_per_block_head + self.v_bytes_per_block_head) / (2 * self.block_size)

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.num_kv_heads * (self.k_bytes_per_block_head + self.v_bytes_per_block_head)


def normalize_kv_dtype(name: str, model_dtype: str = "float32") -> str:
    """The pool dtype for an `EngineArgs.kv_cache_dtype`; auto follows the matrix dtype the engine
    resolved (`model_dtype`: float32 -> fp32, bfloat16 -> bf16), as vLLM's auto does."""
    if name == "auto":
        name = "bf16" if model_dtype == "bfloat16" else "fp32"
    name = {"float32": "fp32", "bfloat16": "bf16"}.get(name, name)
    if name not in KV_DTYPES:
        raise LowbitError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
    n = budget_bytes // spec.bytes_per_block
    if n < 2:
        raise LowbitError(
            f"kv_cache_memory={budget_bytes} bytes holds only {n} KV blocks of {spec.bytes_per_block} bytes; "
            "raise kv_cache_memory or lower block_size"
        )
    return int(n)


class KVCachePool:
    """Owns the K/V tensors; writes new tokens at flat slots (block * block_size + offset) and
    returns gathered blocks dequantized to fp32."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int) -> None:
        if spec.dtype == "int4" and spec.head_dim % 2:
            raise LowbitError(f"int4 KV cache needs an even head_dim, got {spec.head_dim}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = spec.block_size
        H, D, bs = spec.num_kv_heads, spec.head_dim, spec.block_size
        # zeros, not empty: padded gathers read unused slots, and masked-out values must stay finite
        if not spec.quantized:
            shape, dt = (num_blocks, bs, H, D), spec.torch_dtype
        else:
            shape, dt = (num_blocks, bs, H, D if spec.dtype == "int8" else D // 2), torch.uint8
        self.k = [torch.zeros(shape, dtype=dt) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dt) for _ in range(spec.num_layers)]
        if spec.quantized:  # per token and head: [..., 0] = scale, [..., 1] = zero
            sz_shape = (num_blocks, bs, H, 2)
            # int4 K, per block and channel: [:, 0] = scale, [:, 1] = zero
            k_shape, k_dt = ((num_blocks, 2, H, D), torch.float16) if spec.channel_keys else (sz_shape, torch.float32)
            self.k_sz = [torch.zeros(k_shape, dtype=k_dt) for _ in range(spec.num_layers)]
            self.v_sz = [torch.zeros(sz_shape) for _ in range(spec.num_layers)]
        else:
            self.k_sz = self.v_sz = []

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *self.k_sz, *self.v_sz))

    # ---- writing -------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v: [N, Hkv, D] for the N new tokens; slots: [N] flat slot indices."""
        if not self.spec.quantized:
            ref.store_kv(k, v, slots, self.k[layer], self.v[layer])  # rounded to the pool's dtype
            return
        if self.spec.channel_keys:
            self._write_channel_keys(layer, slots, k)
            parts = [(v, self.v[layer], self.v_sz[layer])]
        else:
            parts = [(k, self.k[layer], self.k_sz[layer]), (v, self.v[layer], self.v_sz[layer])]
        ext, dtype = kernels.OPS.get(), self.spec.dtype
        for x, codes, scale_zero in parts:
            if ext is not None and x.dtype == torch.float32 and x.dim() == 3 and x.stride(-1) == 1:
                ext.quantize_to_pool(x, slots, codes, scale_zero, 8 if dtype == "int8" else 4)  # same codes, one pass
            else:
                q, sz = kv_quant.quantize(x, dtype)
                codes.view(-1, *q.shape[1:]).index_copy_(0, slots, q)
                scale_zero.view(-1, *sz.shape[1:]).index_copy_(0, slots, sz)

    def _write_channel_keys(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None:
        """Extend each touched block's per-channel K range to cover the new tokens, remap the
        block's earlier codes onto the new grid (an identity where a channel's range did not
        grow) and quantize the new tokens. A block whose first written row is 0 starts afresh."""
        bs, N = self.block_size, slots.numel()
        H, D = k.shape[1:]
        k = k.float()
        blocks, offs = slots.div(bs, rounding_mode="floor"), slots.remainder(bs)
        ub, inv = torch.unique(blocks, return_inverse=True) if N > 1 else (blocks, torch.zeros(1, dtype=torch.long))
        M = ub.numel()
        if M == N:  # one token per block (decode): its range is the token itself
            first = torch.empty_like(offs).index_copy_(0, inv, offs)
            lo = hi = k if N == 1 else torch.empty_like(k).index_copy_(0, inv, k)
        else:
            first = torch.full((M,), bs, dtype=torch.long).scatter_reduce_(0, inv, offs, "amin")
            idx = inv[:, None, None].expand(N, H, D)
            lo = torch.full((M, H, D), math.inf).scatter_reduce_(0, idx, k, "amin")
            hi = torch.full((M, H, D), -math.inf).scatter_reduce_(0, idx, k, "amax")
        keep = first > 0  # blocks already holding earlier rows of the same sequence
        n_keep = int(keep.sum())
        if n_keep:
            old = self.k_sz[layer].index_select(0, ub).float()
            lo, hi = kv_quant.widen_channel_range(lo, hi, old, None if n_keep == M else keep)
        zero, scale = kv_quant.channel_range(lo, hi)
        if n_keep:
            kb, old_kb, zero_kb, scale_kb = ub, old, zero, scale
            if n_keep < M:
                rows = keep.nonzero().squeeze(1)
                kb, old_kb = ub.index_select(0, rows), old.index_select(0, rows)
                zero_kb, scale_kb = zero.index_select(0, rows), scale.index_select(0, rows)
            codes = kv_quant.remap_channel_codes(self.k[layer].index_select(0, kb), old_kb, zero_kb, scale_kb)
            self.k[layer].index_copy_(0, kb, codes)
        z, s = zero.float(), scale.float()
        if N > 1:
            z, s = z.index_select(0, inv), s.index_select(0, inv)
        self.k[layer].view(-1, H, D // 2).index_copy_(0, slots, kv_quant.quantize_to_channel_range(k, z, s))
        self.k_sz[layer].index_copy_(0, ub, torch.stack([scale, zero], dim=1))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer) before a shared block is written."""
        if not src:
            return
        s, d = torch.tensor(src), torch.tensor(dst)
        for tensors in (self.k, self.v, self.k_sz, self.v_sz):
            for t in tensors:
                t.index_copy_(0, d, t.index_select(0, s))

    # ---- reading -------------------------------------------------------------------------
    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [M] block ids -> K, V as fp32 [M * block_size, Hkv, D] (in block order)."""
        k = self.k[layer].index_select(0, blocks)
        v = self.v[layer].index_select(0, blocks)
        if self.spec.dtype == "bf16":
            k, v = k.float(), v.float()
        if self.spec.channel_keys:
            k = kv_quant.dequantize_channels(k, self.k_sz[layer].index_select(0, blocks))
            v = kv_quant.dequantize(v, self.v_sz[layer].index_select(0, blocks), self.spec.dtype)
        elif self.spec.quantized:
            k = kv_quant.dequantize(k, self.k_sz[layer].index_select(0, blocks), self.spec.dtype)
            v = kv_quant.dequantize(v, self.v_sz[layer].index_select(0, blocks), self.spec.dtype)
        return k.flatten(0, 1), v.flatten(0, 1)

    def view_range(self, layer: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks first..first+count-1 without copying (fp32; bf16 is widened into a copy): the common
        single-sequence case."""
        k = self.k[layer][first : first + count].float()
        v = self.v[layer][first : first + count].float()
        return k.flatten(0, 1), v.flatten(0, 1)
