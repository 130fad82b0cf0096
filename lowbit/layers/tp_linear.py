"""Tensor-parallel linears: column-parallel slices and the row-parallel wrapper.

Column-parallel (q/k/v, gate/up) needs no new module: a rank holds some output rows, so its
linear is just a smaller linear of the same kind (`slice_rows`). Row-parallel (o_proj, down_proj)
holds some input columns; each rank's product is a partial sum, so `RowParallel` all-reduces it,
then adds the bias once (a bias inside the partial sums would be counted N times).
Quantized weights are never sliced here: they are cut at the QuantizedWeight level before packing
(QuantizedWeight.take_rows / take_cols, called by the loader), so a group's scales and zeros stay
with its weights; this file slices fp nn.Linear and wraps whatever linear kind it is given.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..distributed.group import TPGroup
from .linear import QuantLinear
from .permuted import InputPermuted
from .wrapped import LinearWrapper


def slice_rows(lin: nn.Linear, ranges: list[tuple[int, int]]) -> nn.Linear:
    """An nn.Linear of output rows [a, b) of each range (bias sliced along)."""
    w = torch.cat([lin.weight[a:b] for a, b in ranges])
    out = nn.Linear(lin.in_features, w.shape[0], bias=lin.bias is not None, device="meta")
    out.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if lin.bias is not None:
        out.bias = nn.Parameter(torch.cat([lin.bias[a:b] for a, b in ranges]).contiguous(), requires_grad=False)
    return out


def slice_cols(lin: nn.Linear, a: int, b: int) -> nn.Linear:
    """An nn.Linear of input columns [a, b), bias kept (RowParallel takes it out)."""
    out = nn.Linear(b - a, lin.out_features, bias=lin.bias is not None, device="meta")
    out.weight = nn.Parameter(lin.weight[:, a:b].contiguous(), requires_grad=False)
    if lin.bias is not None:
        out.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return out


def pop_bias(m: nn.Module) -> torch.Tensor | None:
    """Removes and returns the bias of a linear of any supported kind."""
    if isinstance(m, InputPermuted):
        return pop_bias(m.inner)
    if isinstance(m, QuantLinear):
        b, m.bias, m._handle = m.bias, None, None  # the bound handle captured the bias: drop it
        return b
    if isinstance(m, nn.Linear):
        b = m.bias
        m.bias = None
        return None if b is None else b.detach()
    raise TypeError(f"cannot take the bias of a {type(m).__name__}")


def slice_head_rows(head: nn.Module, a: int, b: int) -> nn.Module:
    """Output rows [a, b) of an LM head: an fp nn.Linear, or the per-row int8 QuantLinear of
    quantize_embedding (whole rows: each keeps its scale, and its offset when offsets differ)."""
    if type(head) is nn.Linear:
        return slice_rows(head, [(a, b)])
    if isinstance(head, QuantLinear) and head.container_bits == 8 and head.scales.shape[1] == 1:
        offset = head.offset if head.offset.numel() == 1 else head.offset[a:b]
        bias = None if head.bias is None else head.bias[a:b].clone()
        return QuantLinear(head.in_features, b - a, head.bits, head.group_size, head.packed[a:b].clone(),
                           head.scales[a:b].clone(), offset.clone(), bias)
    raise TypeError(f"cannot split an LM head of type {type(head).__name__} by vocabulary")


class VocabParallelHead(LinearWrapper):
    """One rank's rows of the LM head: every rank computes the logits of its vocabulary slice and
    rank 0 gathers them (the others return an empty tensor). Why: the replicated head of a small
    model (SmolLM2: 49152 x 576 fp32 = 113 MB per token) outweighs its whole W4 decoder, and would
    run on rank 0's share of the cores alone."""

    def __init__(self, inner: nn.Module, sizes: list[int], group: TPGroup) -> None:
        super().__init__(inner)
        self.sizes = sizes
        self.group = group

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.inner(h.reshape(-1, h.shape[-1])).float()
        full = self.group.gather_to_driver(local, self.sizes)
        if full is None:
            return local.new_empty(0)
        return full.view(*h.shape[:-1], full.shape[-1])

    def extra_repr(self) -> str:
        return f"rank={self.group.rank}, vocab_slices={self.sizes}"


class RowParallel(LinearWrapper):
    """y = all_reduce(inner(x_local)) + bias: one rank's share of a row-parallel linear."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group: TPGroup) -> None:
        super().__init__(inner)
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32).contiguous())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.inner(x))
        return y if self.bias is None else y.add_(self.bias)

    def direct(self, inner_call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The lean decode loop's call: the inner linear's own call, the all-reduce, the bias."""
        reduce, bias = self.group.all_reduce, self.bias
        if bias is None:
            return lambda x: reduce(inner_call(x))
        return lambda x: reduce(inner_call(x)).add_(bias)

    def extra_repr(self) -> str:
        return f"rank={self.group.rank}, world={self.group.world}, bias={self.bias is not None}"
