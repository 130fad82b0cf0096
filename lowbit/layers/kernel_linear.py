"""KernelLinear: a linear layer whose forward is one call of a registered kernel op on x and the layer's
buffers, the compiled variant or its torch reference (lowbit/kernels/ref.py, same name).

Shared by the int8-activation layers (layers/linear_int8.py: w8a8_linear, w4a8_linear) and the bf16
linear (layers/linear_bf16.py: bf16_linear), so each declares only its op, its kernel family and its
arguments; forward, the engine's direct call and the byte count are written once.
"""
from __future__ import annotations

from torch import nn

from .. import kernels
from ..kernels import ref


class KernelLinear(nn.Module):
    """Subclasses set `_op` (the op's name), `_family` (the kernels family it belongs to) and define
    `_args()` (the buffers after x) and `in_features`."""

    _op: str
    _family: object  # a kernels family: kernels.INT8, kernels.QGEMM
    in_features: int

    def _args(self) -> tuple:
        raise NotImplementedError

    def _fn(self, cpu: bool = True):
        ext = self._family.get()
        return getattr(ref if ext is None or not cpu else ext, self._op)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {tuple(x.shape)}")
        return self._fn(x.device.type == "cpu")(x, *self._args())

    def direct(self):
        """forward as one kernel call with the buffers bound (the engine's lean decode loop; CPU fp32 x)."""
        fn, args = self._fn(), self._args()
        return lambda x: fn(x, *args)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())
