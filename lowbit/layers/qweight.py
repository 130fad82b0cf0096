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

    # ------------------------------------------------------------ tensor-parallel slices
    def take_rows(self, ranges: list[tuple[int, int]]) -> "QuantizedWeight":
        """Output rows [a, b) of each range, concatenated (column-parallel: q/k/v heads, gate/up)."""
        pick = lambda t: torch.cat([t[a:b] for a, b in ranges])  # noqa: E731
        return QuantizedWeight(pick(self.q), pick(self.scales), pick(self.zeros), self.bits, self.group_size, self.sym)

    def take_cols(self, cols: torch.Tensor) -> "QuantizedWeight":
        """Input columns `cols` (int64, in the order wanted; row-parallel: o_proj, down_proj).

        Each group of the result must come whole from one group of this weight, so its scale and
        zero are that group's: the result's group size is the largest g' dividing the group size
        for which every run of g' picked columns lies in one source group (a split at a head
        boundary inside a group of 128 gives groups of 64 with repeated scales: same math).
        Per-channel weights (one group per row) stay per-channel.
        """
        from ..distributed.partition import ShardingError

        g, k = self.group_size, self.in_features
        n = cols.numel()
        if g == k:  # per-channel: the row's one scale covers any subset of columns
            return QuantizedWeight(self.q[:, cols], self.scales, self.zeros, self.bits, n, self.sym)
        src_group = cols // g
        g2 = g
        while g2 > 1:  # the widest runs of picked columns that each sit in one source group
            if n % g2 == 0:
                runs = src_group.view(-1, g2)
                if bool((runs == runs[:, :1]).all()):
                    break
            g2 //= 2
        if g2 % 8 and g2 != n:
            raise ShardingError(f"cannot slice {n} input columns of a group-{g} weight into whole groups "
                                "(the kernels need groups of a multiple of 8)")
        first = src_group.view(-1, g2)[:, 0]
        return QuantizedWeight(self.q[:, cols], self.scales[:, first], self.zeros[:, first], self.bits, g2, self.sym)
