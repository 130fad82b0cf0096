"""Small helpers for swapping modules in a loaded model by their dotted name."""
from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, dotted: str, new: nn.Module | None) -> None:
    """Set root.<dotted> = new; None removes the submodule (e.g. after fusing it into another)."""
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if new is None:
        if child in parent._modules:
            delattr(parent, child)
    else:
        setattr(parent, child, new)
