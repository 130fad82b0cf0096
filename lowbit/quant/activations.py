"""The calibration activations a layer-by-layer quantizer carries from one decoder layer to the next.

Why a store of chunks: only one layer's weights are in memory at a time, so the calibration hidden
states [n_seq, T, H] are pushed through the model one layer at a time, in chunks that bound the
memory of one forward call (chunk_tokens).
"""
from __future__ import annotations

import torch

from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer

FP16_SAFE = 6.0e4  # store a chunk in float16 only if all its values are below this in magnitude


class ActivationStore:
    """The calibration hidden states [n_seq, T, H] carried from layer to layer, kept in chunks.

    Chunks are stored in float16 when every value fits (half the memory, and the stored error is
    far below 3/4-bit weight noise) and in float32 otherwise; they are always served as float32.
    """

    def __init__(self, compact: bool = True) -> None:
        self.compact = compact
        self._chunks: list[torch.Tensor] = []

    def append(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.compact and x.numel():
            # one pass, no temporary: aminmax is NaN when any value is, and NaN fails both tests
            lo, hi = torch.aminmax(x)
            if float(lo) > -FP16_SAFE and float(hi) < FP16_SAFE:
                x = x.to(torch.float16)
        self._chunks.append(x)

    def __iter__(self):
        for c in self._chunks:
            yield c.float()

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def n_sequences(self) -> int:
        return sum(c.shape[0] for c in self._chunks)

    @property
    def n_tokens(self) -> int:
        return sum(c.shape[0] * c.shape[1] for c in self._chunks)

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks)


def chunk_sequences(seqlen: int, chunk_tokens: int) -> int:
    """Sequences per forward call for about chunk_tokens tokens (at least one)."""
    return max(1, chunk_tokens // max(1, seqlen))


def positions_for(x: torch.Tensor) -> torch.Tensor:
    b, t = x.shape[0], x.shape[1]
    return torch.arange(t).expand(b, t)


def run_layer(layer: DecoderLayer, h: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    return layer(h, positions_for(h), rotary)


@torch.no_grad()
def propagate(layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, compact: bool = True) -> ActivationStore:
    """Run the (quantized) layer over every calibration chunk: the next layer's inputs."""
    out = ActivationStore(compact)
    for h in store:
        out.append(run_layer(layer, h, rotary))
    return out
