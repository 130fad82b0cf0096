"""A linear that wraps another (an input gather, a tensor-parallel reduction, a vocabulary slice):
one place for the `inner` module and the shape the rest of the model reads from it."""
from __future__ import annotations

from torch import nn


class LinearWrapper(nn.Module):
    """Holds `inner` and reports its in_features / out_features (a subclass may report its own)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features
