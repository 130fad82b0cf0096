"""A linear whose weight columns were reordered at load (act-order GPTQ checkpoints).

y = inner(x[..., perm]): the weight is stored group-contiguous in perm order, so the input is
gathered once per call (`in` values per token, next to the `in * out` of the matmul) and the
kernel itself never sees a per-element group index. See lowbit/quant/formats/actorder.py for
where the permutations come from and which ones are folded away instead.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .wrapped import LinearWrapper


class InputPermuted(LinearWrapper):
    def __init__(self, inner: nn.Module, perm: torch.Tensor) -> None:
        if perm.dim() != 1 or perm.numel() != inner.in_features:
            raise ValueError(f"permutation of {perm.numel()} channels for a linear of {inner.in_features} inputs")
        super().__init__(inner)
        self.register_buffer("perm", perm.to(torch.int64).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm))

    def direct(self, inner_call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The lean decode loop's call: the gather, then the inner module's own direct call."""
        perm = self.perm
        return lambda x: inner_call(x.index_select(-1, perm))
