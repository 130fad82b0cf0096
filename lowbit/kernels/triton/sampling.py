"""Token choice on the GPU: greedy argmax and the seeded exponential race.

Greedy is a row-wise argmax with lowbit's CPU tie rule (the first of tied maxima; a NaN wins,
the first NaN, as torch's max does), so the same logits give the same token on either device:
greedy decoding on the GPU matches the CPU wherever the logits' top-2 margin exceeds the two
devices' numeric difference.

Random rows use the CPU sampler's draw, token = argmax_v p_v / q_v with q_v = -log(u_v),
u ~ U[0, 1) (the exponential race: token v wins with probability p_v), but u comes from
triton's counter-based Philox keyed by a per-row seed, not from a torch.Generator stream. So a
seed gives the same draws on every GPU run, whatever the batch, but NOT the same draws as the
CPU engine with that seed. Callers derive one seed per (request, step) with `step_seeds`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BIG = 2**31 - 1


@triton.jit
def _pick_kernel(x_ptr, seed_ptr, out_ptr, V, s_x, BLOCK: tl.constexpr, RACE: tl.constexpr):
    """Per lane: the best value so far and its index (strictly greater wins, so a lane keeps its
    earliest maximum) and the first NaN; the lanes are reduced once at the end."""
    row = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    best_i = lane * 0
    nan_i = lane * 0 + _BIG
    if RACE:
        seed = tl.load(seed_ptr + row)
    for v0 in range(0, V, BLOCK):
        idx = v0 + lane
        m = idx < V
        x = tl.load(x_ptr + row * s_x + idx, mask=m, other=float("-inf")).to(tl.float32)
        if RACE:  # p / q with q ~ Exp(1); u = 0 gives q = inf: that token cannot win
            u = tl.rand(seed, idx)
            x = x / (-tl.log(u))
        isn = (x != x) & m
        nan_i = tl.where(isn & (nan_i == _BIG), idx, nan_i)
        x = tl.where(isn, float("-inf"), x)
        upd = x > best
        best_i = tl.where(upd, idx, best_i)
        best = tl.where(upd, x, best)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_i, _BIG), axis=0)  # an all -inf row: lane 0's index 0
    first_nan = tl.min(nan_i, axis=0)
    tl.store(out_ptr + row, tl.where(first_nan < _BIG, first_nan, first).to(tl.int64))


def _pick(x: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        raise ValueError(f"expected floating [batch, vocab] scores, got {tuple(x.shape)} {x.dtype}")
    if x.shape[1] >= _BIG:
        raise ValueError("vocabulary too large for 32-bit indices")
    if x.stride(1) != 1:
        x = x.contiguous()
    B, V = x.shape
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    if B:
        block = min(4096, triton.next_power_of_2(V))
        _pick_kernel[(B,)](x, seeds if seeds is not None else out, out, V, x.stride(0), BLOCK=block,
                           RACE=seeds is not None)
    return out


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> int64 [B]: the first maximum of each row (the first NaN if a row has one)."""
    return _pick(logits, None)


def step_seeds(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One Philox key per (request seed, decode step), int64 [B] in [0, 2**31): a fixed integer
    hash, so the key depends only on the request's seed and how many tokens it has drawn."""
    h = (seeds.to(torch.int64) * 1000003 + steps.to(torch.int64) * 7919 + 12345) & 0x7FFFFFFF
    return h ^ (h >> 13)


def sample(probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """[B, V] probabilities (after temperature and filters) and int64 [B] keys -> int64 [B]:
    argmax_v probs / Exp(1) noise from Philox(key, v)."""
    if seeds.shape != (probs.shape[0],):
        raise ValueError(f"need one seed per row: {probs.shape[0]}, got {tuple(seeds.shape)}")
    return _pick(probs, seeds.to(torch.int64).contiguous())
