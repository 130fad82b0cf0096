"""Attention math shared by every path.

The decoder hands q/k/v to an `AttentionContext` when one is given (the engine's paged KV cache
implements it); without one it runs plain causal attention over a [batch, time] block, which is
what calibration, perplexity evaluation and the reference path use.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, Hq, D], k/v: [N, Hkv, D] for the N new tokens of this step -> [N, Hq, D]."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q: [B, T, Hq, D], k/v: [B, T, Hkv, D] -> [B, T, Hq, D]; GQA by head grouping."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    T = q.shape[-2]
    if window is not None and T > window:
        i = torch.arange(T)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)
