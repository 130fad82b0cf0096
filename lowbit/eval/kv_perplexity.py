"""Perplexity through the serving KV path: what a quantized KV cache costs in accuracy.

`lowbit.eval.perplexity` runs the plain causal forward (no cache), so it cannot see the KV cache.
Here every window of the same protocol (joined stream, non-overlapping windows of `seqlen`,
last partial window dropped, every prediction counts) is fed through the engine's real code
path: a `KVCachePool` of the chosen dtype, `build_paged_context` and the model forward with that
context, `chunk` tokens per step. Each step writes its k/v into the pool (quantized for int8 /
int4) and its queries read the earlier chunks back from the pool, as a chunked prefill does.

Within a chunk the engine's prefill attends to the chunk's own *exact* k/v; only later steps see
them quantized. That would make the result depend on the chunk size (chunk = seqlen would hide
most of the quantization). So by default (`quantized_chunk=True`) the chunk reads its own k/v back
from the pool too: every query sees only stored, dequantized keys and values, exactly what a
decode step sees for the tokens it generates. With int8 (per-token ranges) the result is then
independent of the chunk size up to float summation order. int4 keys have one range per channel
per block, recomputed when a write extends a partly filled block (lowbit/engine/kv_cache.py), so
how a block was filled matters a little: a chunk that is a multiple of the block size writes whole
blocks at once, as a long prefill does; token-by-token decode re-rounds partial blocks (default
model, one window: int4 costs +1.2% perplexity with chunk 256 and +1.6% with chunk 7). With an fp32 pool the result equals `perplexity()` up to float rounding.

DEFAULT_CHUNK = 256: a multiple of every block size the engine allows up to 128, and large enough
that the per-step Python cost is small next to the matmuls.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.executor import execute
from ..engine.kv_cache import KVCachePool, KVCacheSpec, normalize_kv_dtype
from ..engine.paged_attention import SeqSlice, build_paged_context
from .perplexity import DEFAULT_SEQLEN, LOGIT_ROWS, EvalError

DEFAULT_CHUNK = 256  # tokens per step (see the module docstring)
DEFAULT_BLOCK_SIZE = 16  # the engine's default block size


@dataclass
class KVPerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # predicted tokens scored
    n_windows: int
    seqlen: int
    seconds: float
    kv_cache_dtype: str  # fp32 | int8 | int4
    chunk: int
    quantized_chunk: bool
    bytes_per_token: int  # KV bytes one token takes in the pool (all layers, K and V, scales included)


def kv_spec_for(model: torch.nn.Module, kv_cache_dtype: str, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCacheSpec:
    cfg = model.config
    return KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, normalize_kv_dtype(kv_cache_dtype))


def _resolve_model(model_spec_or_loaded) -> torch.nn.Module:
    """A CausalLM, a LoadedModel, or anything `load_model` accepts (path, alias, None = default)."""
    if isinstance(model_spec_or_loaded, torch.nn.Module):
        return model_spec_or_loaded
    if hasattr(model_spec_or_loaded, "model") and isinstance(model_spec_or_loaded.model, torch.nn.Module):
        return model_spec_or_loaded.model
    from ..quant.loader import load_model

    return load_model(model_spec_or_loaded, with_tokenizer=False).model


@torch.no_grad()
def window_nll_paged(
    model: torch.nn.Module, pool: KVCachePool, ids: torch.Tensor, chunk: int, quantized_chunk: bool
) -> tuple[float, int]:
    """One window through the pool, `chunk` tokens per step: sum of -log p and the prediction count.
    The pool must hold the whole window in blocks 0.. (it is overwritten, never cleared)."""
    T = ids.numel() - 1  # the window's last token predicts nothing: it is never fed
    table = list(range(-(-T // pool.block_size)))
    window = getattr(model.config, "sliding_window", None)
    total = 0.0
    for start in range(0, T, chunk):
        n = min(chunk, T - start)  # n == 1 (a lone last token) runs as a decode step: same attention
        ctx = build_paged_context(pool, [SeqSlice(table, start, n)], window, quantized_chunk=quantized_chunk)
        hidden = execute(model, ids[start : start + n], ctx.positions, ctx)  # [n, H]
        targets = ids[start + 1 : start + n + 1]
        for r in range(0, n, LOGIT_ROWS):
            logits = model.compute_logits(hidden[r : r + LOGIT_ROWS]).float()
            total += float(F.cross_entropy(logits, targets[r : r + LOGIT_ROWS], reduction="sum").double())
    return total, T


def perplexity_with_kv_cache(
    model_spec_or_loaded,
    token_ids: torch.Tensor,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    kv_cache_dtype: str = "int8",
    chunk: int = DEFAULT_CHUNK,
    quantized_chunk: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: bool = False,
) -> KVPerplexityResult:
    """Perplexity of `token_ids` (one tokenized stream) with attention served from a paged KV pool
    of `kv_cache_dtype` (auto/fp32, int8, int4); windows as in `lowbit.eval.perplexity`."""
    if not isinstance(seqlen, int) or seqlen < 2:
        raise EvalError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise EvalError(f"max windows must be a positive integer, got {max_windows!r}")
    if not isinstance(chunk, int) or chunk < 2:
        raise EvalError(f"chunk must be an integer >= 2 (tokens per step), got {chunk!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise EvalError(f"block_size must be a positive integer, got {block_size!r}")
    model = _resolve_model(model_spec_or_loaded)
    spec = kv_spec_for(model, kv_cache_dtype, block_size)
    ids = torch.as_tensor(token_ids).reshape(-1).to(torch.int64)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise EvalError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    pool = KVCachePool(spec, -(-seqlen // block_size))
    t0 = time.perf_counter()
    windows = range(n)
    if progress:
        from tqdm import tqdm

        windows = tqdm(windows, desc=f"ppl kv={spec.dtype}", unit="window", dynamic_ncols=True)
    total, count = 0.0, 0
    for w in windows:
        s, c = window_nll_paged(model, pool, ids[w * seqlen : (w + 1) * seqlen], chunk, quantized_chunk)
        total += s
        count += c
    nll = total / count
    return KVPerplexityResult(
        ppl=math.exp(nll) if nll < 700 else math.inf, nll=nll, n_tokens=count, n_windows=n, seqlen=seqlen,
        seconds=time.perf_counter() - t0, kv_cache_dtype=spec.dtype, chunk=chunk, quantized_chunk=quantized_chunk,
        bytes_per_token=spec.bytes_per_block // spec.block_size,
    )


def tokens_per_budget(spec: KVCacheSpec, budget_bytes: int = 512 * 2**20) -> int:
    """Tokens a pool of `budget_bytes` holds (whole blocks, as the engine sizes it)."""
    return budget_bytes // spec.bytes_per_block * spec.block_size


__all__ = ["KVPerplexityResult", "perplexity_with_kv_cache", "window_nll_paged", "kv_spec_for", "tokens_per_budget",
           "DEFAULT_CHUNK"]
