"""The canonical in-memory form of a group-quantized weight.

Every quantizer produces it, every checkpoint format converts to and from it, and every
kernel repacks from it, so formats and kernels never need to know about each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """W[out, in] ~= (q - zero) * scale, group-wise along the input dimension.

    q:      uint8 [out, in], values in [0, 2**bits - 1] (unpacked; one value per byte)
    scales: float32 [out, in // group_size]
    zeros:  uint8 [out, in // group_size]; for symmetric quantization every zero is 2**(bits-1)
    group_size: the real group size (per-channel quantization stores group_size == in_features)
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    sym: bool = False

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_size
        scales = self.scales.to(dtype).repeat_interleave(g, dim=1)
        zeros = self.zeros.to(dtype).repeat_interleave(g, dim=1)
        return (self.q.to(dtype) - zeros) * scales
