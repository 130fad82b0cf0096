"""Rotary position embedding (the non-interleaved 'rotate half' layout of HF checkpoints).

The one place rotary frequencies are built: the decoder's cos/sin table, the quantizer's
layer-by-layer runs and the GGUF importer's rope-scaling recovery all derive from the functions
here, so a scaling type is defined once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import ops


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3 | dynamic is refused
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def base_inv_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Unscaled 1 / theta^(2i / head_dim), float64 (half of head_dim entries)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def scaled_inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """The frequencies after `rope`'s scaling, float64."""
    inv = base_inv_frequencies(head_dim, rope.theta)
    if rope.type == "linear":
        inv = inv / rope.factor
    elif rope.type == "llama3":
        # Llama-3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        old = rope.original_max_position_embeddings
        low_wl = old / rope.low_freq_factor
        high_wl = old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mid = (1 - smooth) * inv / rope.factor + smooth * inv
        inv = torch.where(wl > low_wl, inv / rope.factor, torch.where(wl < high_wl, inv, mid))
    return inv


def inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """The float32 frequencies the cos/sin table is built from."""
    return scaled_inv_frequencies(head_dim, rope).float()


class RotaryEmbedding(nn.Module):
    """Holds a cos/sin table indexed by absolute position; grows on demand."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inv_frequencies(head_dim, rope), persistent=False)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def ensure(self, max_position: int) -> None:
        """Grow the table (doubling) so it covers `max_position`; call once per model forward."""
        if max_position >= self.cos_sin.shape[0]:
            self._build(max(max_position + 1, 2 * self.cos_sin.shape[0]))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [..., Hq, D], k: [..., Hk, D]; positions has q's leading shape. Out of place (the
        reference path: calibration and evaluation keep their inputs)."""
        if positions.numel():
            self.ensure(int(positions.max()))
        cos, sin = self.cos_sin[positions].unsqueeze(-2).chunk(2, dim=-1)
        return ops.rotate_ref(q, cos, sin), ops.rotate_ref(k, cos, sin)

    def apply_(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotate q and k in place (the engine path; the table must already cover positions)."""
        ops.rotary_(q, k, positions, self.cos_sin)
