"""Attention over the paged KV pool for one mixed engine step (decodes + prefill chunks).

The step's flat token rows are ordered: first every sequence that adds exactly one token (the
decode batch), then the prefill chunks. Everything that does not depend on the layer (slot
mapping, padded block tables, masks) is built once per step in `build_paged_context`; `attend`
then costs a handful of tensor ops per layer:

* decode: one call of the fused kernel (lowbit/layers/ops.py `paged_decode_attention`) that reads
  every sequence's blocks in place through an int32 block table built once per step; without the
  extension, one padded gather of all sequences' blocks + one masked SDPA call (GQA by viewing the
  query heads as [Hkv, group]), a single sequence whose blocks are contiguous reading a view;
* prefill chunk: SDPA of the chunk's queries over (cached prefix + the chunk's own exact k/v) with
  an offset causal mask; a chunk starting at position 0 needs no cache read at all. Over a bf16
  pool, prefill SDPA runs in bf16 (q, k, v rounded as the pool rounds k and v): torch's bf16
  flash attention uses the CPU's bf16 dot products (AMX, AVX512_BF16), 3.8x its fp32 rate for
  1024-token prompts on a Xeon with AMX, where a prompt's attention was a third of its prefill. With
  `quantized_chunk=True` (evaluation: lowbit/eval/kv_perplexity.py) a quantized pool's chunk reads
  its own k/v back from the pool too, so every query sees exactly the stored (quantized) keys and
  values a decode step would see, whatever the chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

from .. import kernels
from ..layers import ops
from . import kv_cache
from .kv_cache import KVCachePool


@dataclass
class SeqSlice:
    """One sequence's share of the step: `num_new` tokens at positions start..start+num_new-1."""

    block_table: list[int]
    start: int  # tokens of this sequence already in the cache
    num_new: int


@dataclass
class _DecodeMeta:
    batch: int
    blocks: torch.Tensor | None  # [B * max_blocks] flat padded block ids (None: contiguous view)
    first_block: int  # contiguous view start (batch == 1 only)
    num_blocks: int
    kv_start: int  # batch == 1: first key position to use (sliding window); else 0
    kv_len: int  # batch == 1: context length; else padded length
    mask: torch.Tensor | None  # [B, 1, 1, L] bool (batch > 1)
    tables: torch.Tensor | None = None  # int32 [B, max_blocks]: set when the fused kernel runs the step
    lens: torch.Tensor | None = None  # int32 [B] context lengths (the new token included)
    window: int = 0


@dataclass
class _PrefillMeta:
    row: int
    num_new: int
    start: int
    prefix_blocks: torch.Tensor | None
    mask: torch.Tensor | None  # [T, S] bool, None -> plain causal
    from_pool: bool = False  # prefix_blocks cover the chunk too: read its k/v back from the pool


class PagedAttentionContext:
    """Implements the decoder's `AttentionContext` protocol over a KVCachePool.

    `fuses_rotary`: the decoder may call `attend_rotary` with q/k before rotary, so rotary and
    the KV write happen in one kernel call; `max_position` lets it size the rotary table once.
    """

    fuses_rotary = True

    def __init__(
        self,
        pool: KVCachePool,
        slots: torch.Tensor,
        positions: torch.Tensor,
        decode: _DecodeMeta | None,
        prefills: list[_PrefillMeta],
        num_tokens: int,
    ) -> None:
        self.pool = pool
        self.slots = slots
        self.positions = positions
        self.decode = decode
        self.prefills = prefills
        self.num_tokens = num_tokens
        self.max_position: int | None = None  # set by build_paged_context
        # `lean`: a pure decode step the fused kernels run whole, so the decoder may hand its fused
        # qkv projection to attend_qkv (three kernel calls per layer, no Python-side views).
        self._ext = kernels.OPS.get()
        self.lean = self._ext is not None and decode is not None and decode.tables is not None and not prefills
        self.scale = 1.0 / math.sqrt(pool.spec.head_dim)
        self._prefill_runs = _fresh_runs(prefills)
        self._sdpa_dtype = torch.bfloat16 if pool.spec.dtype == "bf16" else None  # prefill SDPA (see module doc)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, Hq, D], k/v: [N, Hkv, D] (rotary applied) -> [N, Hq, D]."""
        self.pool.write(layer_idx, self.slots, k, v)
        return self._attend_written(layer_idx, q, k, v)

    def attend_rotary(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary) -> torch.Tensor:
        """attend() for q/k before rotary: rotates them in place and writes k/v to the pool (one
        fused call for an fp32 pool; a quantized pool quantizes through its own write)."""
        pool = self.pool
        if pool.spec.quantized:
            rotary.apply_(self.positions, q, k)
            pool.write(layer_idx, self.slots, k, v)
        else:
            ops.rotary_and_cache(q, k, v, self.positions, rotary.cos_sin, self.slots, pool.k[layer_idx], pool.v[layer_idx])
        return self._attend_written(layer_idx, q, k, v)

    def attend_qkv(self, layer_idx: int, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                   cos_sin: torch.Tensor) -> torch.Tensor:
        """Pure decode steps only (`lean`): rotary, the KV write and attention straight from the
        fused projection qkv [B, (Hq + 2 Hkv) D] (q, k before rotary) -> [B, Hq * D]."""
        ext, pool, d = self._ext, self.pool, self.decode
        if pool.spec.quantized:
            ext.rotary_qkv_(qkv, num_heads, num_kv_heads, self.positions, cos_sin)
            D = pool.spec.head_dim
            _, k, v = qkv.view(-1, num_heads + 2 * num_kv_heads, D).split([num_heads, num_kv_heads, num_kv_heads], 1)
            pool.write(layer_idx, self.slots, k, v)
            sz = (pool.k_sz[layer_idx], pool.v_sz[layer_idx])
        else:
            ext.rotary_and_cache_qkv(qkv, num_heads, num_kv_heads, self.positions, cos_sin, self.slots,
                                     pool.k[layer_idx], pool.v[layer_idx])
            sz = (None, None)
        return ext.paged_decode_attention_qkv(qkv, num_heads, num_kv_heads, d.batch, pool.k[layer_idx],
                                              pool.v[layer_idx], *sz, d.tables, d.lens, self.scale, d.window,
                                              ops.KV_CODES[pool.spec.dtype])

    def _attend_written(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.decode is not None:
            parts.append(self._decode(layer_idx, q[: self.decode.batch]))
        for run in self._prefill_runs:
            if len(run) > 1:  # fresh prompts of one length: one batched causal SDPA call
                rows = slice(run[0].row, run[-1].row + run[-1].num_new)
                parts.append(_causal_batch(q[rows], k[rows], v[rows], len(run), self._sdpa_dtype))
                continue
            p = run[0]
            rows = slice(p.row, p.row + p.num_new)
            parts.append(self._prefill(layer_idx, p, q[rows], k[rows], v[rows]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        d = self.decode
        B, Hq, D = q.shape
        if d.tables is not None:
            p = self.pool
            sz = (p.k_sz[layer], p.v_sz[layer]) if p.spec.quantized else (None, None)
            return ops.paged_decode_attention(
                q, p.k[layer], p.v[layer], d.tables, d.lens, 1.0 / math.sqrt(D), d.window, *sz, kv_dtype=p.spec.dtype
            )
        if d.blocks is None:
            k, v = self.pool.view_range(layer, d.first_block, d.num_blocks)
        else:
            k, v = self.pool.gather(layer, d.blocks)
        Hkv = k.shape[-2]
        qg = q.view(B, Hkv, Hq // Hkv, D)  # query heads grouped under their kv head
        if B == 1:
            k = k[d.kv_start : d.kv_len].transpose(0, 1).unsqueeze(0)
            v = v[d.kv_start : d.kv_len].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qg, k, v)
        else:
            k = k.view(B, -1, Hkv, D).transpose(1, 2)
            v = v.view(B, -1, Hkv, D).transpose(1, 2)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=d.mask)
        return out.reshape(B, Hq, D)

    def _prefill(self, layer: int, p: _PrefillMeta, q, k, v) -> torch.Tensor:
        if p.from_pool:
            k, v = self.pool.gather(layer, p.prefix_blocks)
            k, v = k[: p.start + p.num_new], v[: p.start + p.num_new]
        elif p.prefix_blocks is not None:
            pk, pv = self.pool.gather(layer, p.prefix_blocks)
            k = torch.cat([pk[: p.start], k], dim=0)
            v = torch.cat([pv[: p.start], v], dim=0)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if p.mask is None:
            out = _sdpa(q, k, v, self._sdpa_dtype, is_causal=True)
        else:
            out = _sdpa(q, k, v, self._sdpa_dtype, attn_mask=p.mask)
        return out[0].transpose(0, 1)


def _fresh(p: _PrefillMeta) -> bool:
    """A chunk that attends only to itself with a plain causal mask (a prompt's first chunk)."""
    return p.start == 0 and p.mask is None and p.prefix_blocks is None and not p.from_pool


def _fresh_runs(prefills: list[_PrefillMeta]) -> list[list[_PrefillMeta]]:
    """The prefill chunks in row order, consecutive fresh chunks of equal length grouped (8 fresh
    128-token prompts: one SDPA call of 1.7 ms per layer instead of 8 calls, 2.5 ms in all)."""
    runs: list[list[_PrefillMeta]] = []
    for p in prefills:
        last = runs[-1][-1] if runs else None
        if (last is not None and _fresh(p) and _fresh(last) and p.num_new == last.num_new
                and p.row == last.row + last.num_new):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None, **kw) -> torch.Tensor:
    """GQA SDPA in `dtype` (None: as given), the result in q's dtype."""
    if dtype is None or dtype == q.dtype:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True, **kw)
    return out.to(q.dtype)


def _causal_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal attention of `batch` equal-length sequences stacked on dim 0: q [B*T, Hq, D]."""
    T = q.shape[0] // batch
    q, k, v = (t.view(batch, T, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    out = _sdpa(q, k, v, dtype, is_causal=True)
    return out.transpose(1, 2).reshape(batch * T, out.shape[1], out.shape[3])


def build_paged_context(
    pool: KVCachePool, items: list[SeqSlice], window: int | None = None, *, quantized_chunk: bool = False
) -> PagedAttentionContext:
    """Precompute a step's index tensors. Items with num_new == 1 must come first (the decode batch).

    quantized_chunk: prefill chunks attend to their own k/v as stored in a quantized pool (what a
    decode step sees) instead of the exact activations; no effect on an fp32 pool.
    """
    read_back = quantized_chunk and pool.spec.quantized
    bs = pool.block_size
    n_dec = 0
    while n_dec < len(items) and items[n_dec].num_new == 1:
        n_dec += 1
    slots: list[int] = []
    positions: list[int] = []
    for it in items[:n_dec]:
        slots.append(it.block_table[it.start // bs] * bs + it.start % bs)
        positions.append(it.start)
    decode = _decode_meta(pool, items[:n_dec], window) if n_dec else None
    top = max((it.start + it.num_new - 1 for it in items), default=None)
    slot_t = torch.tensor(slots, dtype=torch.long)
    pos_t = torch.tensor(positions, dtype=torch.long)
    slot_parts, pos_parts, prefills = [slot_t], [pos_t], []
    row = n_dec
    for it in items[n_dec:]:
        if it.num_new == 1:
            raise ValueError("single-token items must come first in the step")
        pos = torch.arange(it.start, it.start + it.num_new)
        nb_total = (it.start + it.num_new + bs - 1) // bs
        bt = torch.tensor(it.block_table[:nb_total], dtype=torch.long)
        slot_parts.append(bt[pos // bs] * bs + pos % bs)
        pos_parts.append(pos)
        prefills.append(_prefill_meta(it, row, bs, window, read_back))
        row += it.num_new
    ctx = PagedAttentionContext(
        pool,
        torch.cat(slot_parts) if prefills else slot_t,
        torch.cat(pos_parts) if prefills else pos_t,
        decode,
        prefills,
        row,
    )
    ctx.max_position = top
    return ctx


_LAYOUT_OK: dict[str, bool] = {}


def _kernel_reads(pool: KVCachePool) -> bool:
    """Whether the fused decode kernel can read this pool in place: fp32 always; bf16/int8/int4 when a
    probe says the kernel reads the pool's scheme right (checked once per dtype), so a change of
    the KV quantization (lowbit/layers/kv_quant.py) falls back to the torch path instead of being misread."""
    dtype = pool.spec.dtype
    if not ops.paged_decode_supported(pool.spec.head_dim, dtype):
        return False
    if dtype not in _LAYOUT_OK:
        _LAYOUT_OK[dtype] = dtype == "fp32" or _probe_layout(dtype)
    return _LAYOUT_OK[dtype]


def _probe_layout(dtype: str) -> bool:
    """Writes tokens into a small pool of `dtype` through its own write() (two steps, so a block is
    extended), then compares the kernel with softmax attention over the pool's own gather()."""
    try:
        spec = kv_cache.KVCacheSpec(1, 2, 32, 4, dtype)
        pool = KVCachePool(spec, 4)
        g = torch.Generator().manual_seed(0)
        for slots in (torch.arange(6), torch.tensor([6, 12])):  # blocks 0, 1 (grown), 3
            n = slots.numel()
            pool.write(0, slots, torch.randn(n, 2, 32, generator=g), torch.randn(n, 2, 32, generator=g))
        tables = torch.tensor([[0, 1, 0, 0], [3, 0, 0, 0]], dtype=torch.int32)
        lens = [7, 1]
        q = torch.randn(2, 4, 32, generator=g)
        sz = (pool.k_sz[0], pool.v_sz[0]) if spec.quantized else (None, None)
        got = ops.paged_decode_attention(q, pool.k[0], pool.v[0], tables, torch.tensor(lens, dtype=torch.int32),
                                         32**-0.5, 0, *sz, kv_dtype=dtype)
        for b, n in enumerate(lens):
            k, v = pool.gather(0, tables[b, : (n + 3) // 4].long())
            k, v = k[:n].repeat_interleave(2, dim=1), v[:n].repeat_interleave(2, dim=1)  # [n, Hq, D]
            w = torch.einsum("hd,nhd->hn", q[b], k).mul(32**-0.5).softmax(-1)
            if not torch.allclose(got[b], torch.einsum("hn,nhd->hd", w, v), rtol=1e-4, atol=1e-4):
                return False
        return True
    except Exception:  # shapes or dtypes the kernel does not know: use the torch path
        return False


def _decode_meta(pool: KVCachePool, items: list[SeqSlice], window: int | None) -> _DecodeMeta:
    bs = pool.block_size
    if _kernel_reads(pool):  # the kernel reads blocks in place: only block tables and lengths
        lens = [it.start + 1 for it in items]
        max_nb = (max(lens) + bs - 1) // bs
        rows = [it.block_table[: (n + bs - 1) // bs] for it, n in zip(items, lens)]
        tables = torch.tensor([r + [0] * (max_nb - len(r)) for r in rows], dtype=torch.int32)
        meta = _DecodeMeta(len(items), None, 0, max_nb, 0, max(lens), None)
        meta.tables, meta.lens, meta.window = tables, torch.tensor(lens, dtype=torch.int32), window or 0
        return meta
    if len(items) == 1:
        it = items[0]
        ctx = it.start + 1
        nb = (ctx + bs - 1) // bs
        table = it.block_table[:nb]
        kv_start = max(0, ctx - window) if window else 0
        first = table[0]
        contiguous = not pool.spec.quantized and table[-1] - first == nb - 1 and table == list(range(first, first + nb))
        blocks = None if contiguous else torch.tensor(table, dtype=torch.long)
        return _DecodeMeta(1, blocks, first, nb, kv_start, ctx, None)
    lens = [it.start + 1 for it in items]
    max_nb = (max(lens) + bs - 1) // bs
    flat: list[int] = []
    for it, n in zip(items, lens):
        nb = (n + bs - 1) // bs
        flat.extend(it.block_table[:nb])
        flat.extend([0] * (max_nb - nb))  # padding: any valid block, masked out below
    L = max_nb * bs
    lens_t = torch.tensor(lens)
    kpos = torch.arange(L)
    mask = kpos[None, :] < lens_t[:, None]
    if window:
        mask &= kpos[None, :] > (lens_t[:, None] - 1 - window)
    return _DecodeMeta(len(items), torch.tensor(flat, dtype=torch.long), 0, max_nb, 0, L, mask[:, None, None, :])


def _prefill_meta(it: SeqSlice, row: int, bs: int, window: int | None, read_back: bool = False) -> _PrefillMeta:
    T, start = it.num_new, it.start
    prefix = None
    if read_back:
        prefix = torch.tensor(it.block_table[: (start + T + bs - 1) // bs], dtype=torch.long)
    elif start > 0:
        prefix = torch.tensor(it.block_table[: (start + bs - 1) // bs], dtype=torch.long)
    mask = None
    if start > 0 or (window and T > window):
        qpos = torch.arange(start, start + T)[:, None]
        kpos = torch.arange(start + T)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
    return _PrefillMeta(row, T, start, prefix, mask, read_back)
