"""Round-to-nearest (RTN): every Linear of a decoder layer quantized on its own grid, no data.

It is the baseline AWQ is measured against, and AWQ's last step (after scaling and clipping the
weights AWQ quantizes them exactly like this), so both methods share `QuantSpec`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantizationError
from .primitives import check_bits, fake_quantize, quantize_weight, resolve_group_size
from ..layers.qweight import QuantizedWeight

# The modules that are never quantized (their names in HF checkpoints); recorded in the checkpoint.
MODULES_NOT_CONVERTED = ("lm_head",)


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid: bits, group size along the input dim (-1 = per output channel), symmetry.

    scale_dtype rounds the scales the way the checkpoint stores them (float16 for both formats),
    so the weights computed here are bit-for-bit those a loaded checkpoint dequantizes to.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    scale_dtype: torch.dtype | None = torch.float16

    def validate(self, in_features: int, name: str = "layer") -> int:
        """The real group size for a layer; QuantizationError when it cannot be quantized."""
        check_bits(self.bits)
        try:
            return resolve_group_size(in_features, self.group_size)
        except QuantizationError as e:
            raise QuantizationError(f"{name}: {e}") from None

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_weight(w, self.bits, self.group_size, self.sym, scale_dtype=self.scale_dtype)

    def fake(self, w: torch.Tensor, max_val: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize-dequantize (fp32 scales: the cheap form used inside searches)."""
        return fake_quantize(w, self.bits, self.group_size, self.sym, max_val=max_val)

    @property
    def per_channel(self) -> bool:
        return self.group_size in (-1, 0, None)


def linear_names(module: nn.Module) -> list[str]:
    """Names of the nn.Linear submodules, in definition order (q, k, v, o, gate, up, down)."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def check_layer(layer: nn.Module, spec: QuantSpec, prefix: str = "") -> None:
    for name in linear_names(layer):
        spec.validate(layer.get_submodule(name).in_features, prefix + name)


@torch.no_grad()
def rtn_quantize_layer(layer: nn.Module, spec: QuantSpec) -> dict[str, QuantizedWeight]:
    """Quantize every Linear of `layer`; the module itself is left unchanged."""
    return {name: spec.quantize(layer.get_submodule(name).weight) for name in linear_names(layer)}


@torch.no_grad()
def load_dequantized_(layer: nn.Module, qweights: dict[str, QuantizedWeight]) -> None:
    """Replace each Linear's weight by its dequantized value: numerically what the quantized
    checkpoint computes, so the next layer's calibration inputs see the real quantization error."""
    for name, qw in qweights.items():
        lin = layer.get_submodule(name)
        lin.weight.data = qw.dequantize(torch.float32).to(lin.weight.dtype)


@torch.no_grad()
def fake_quantize_model_(model: nn.Module, spec: QuantSpec, skip: tuple[str, ...] = MODULES_NOT_CONVERTED) -> int:
    """RTN every Linear of an in-memory model in place (evaluation and tests); returns the count."""
    count = 0
    for name in linear_names(model):
        if name.split(".")[-1] in skip or name in skip:
            continue
        lin = model.get_submodule(name)
        lin.weight.data = spec.quantize(lin.weight).dequantize(torch.float32).to(lin.weight.dtype)
        count += 1
    return count
