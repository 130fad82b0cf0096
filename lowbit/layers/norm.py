"""RMSNorm, computed in fp32 like the reference implementations.

The math lives in lowbit/layers/ops.py: one fused kernel call on the fast path (fp32), the
reference op chain otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += x (in place), then the norm of the updated residual: a sublayer's residual
        add fused with the norm that follows it (one pass over the row instead of two)."""
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
