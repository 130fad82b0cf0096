"""Linear layers with int8 activations: W8A8 (SmoothQuant checkpoints) and W4A8 (4-bit AWQ / RTN
weights run on int8 activations, `--activation-dtype int8`).

Why: with both operands 8-bit the multiply-adds are byte products (32 per AVX2 vpmaddubsw, 64 per
AVX-512 VNNI vpdpbusd) instead of 8 per fp32 FMA, so prefill and wide batches get cheaper; decode
still streams the same weight bytes. Activations are quantized per token (row), symmetric, at every
call (dynamic), inside the kernel: nothing about them is stored or calibrated.

The weights are repacked once, here, into the panel layouts of lowbit/kernels/csrc/qgemm/int8.h
(16 output channels per panel, the same for every instruction set); the torch reference
(lowbit/kernels/ref.py) reads the same buffers, so LOWBIT_NO_EXT=1 runs the same math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.errors import QuantizationError
from lowbit.kernels import ref
from lowbit.layers.kernel_linear import KernelLinear
from lowbit.layers.linear import QuantLinear, _round_up
from lowbit.layers.qweight import QuantizedWeight

PANEL = ref.PANEL


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0])) if t.shape[0] != rows else t


# ----------------------------------------------------------------------------- packing


def pack_w8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (packed int8 [P, Kp/4, 16, 4], rowsum int32 [16P]); Kp = K rounded up to 8."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise QuantizationError(f"W8A8 weights must be int8 [out, in], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    np_, kp = _round_up(n, PANEL), _round_up(k, 8)
    wp = F.pad(w, (0, kp - k, 0, np_ - n))
    packed = wp.view(np_ // PANEL, PANEL, kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    return packed, wp.sum(dim=1, dtype=torch.int32)


def pack_w4(q: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 codes [N, Kp] (< 16, Kp % 8 == 0) -> uint8 [P, Kp/8, 64] (nibble pairs of int8.h)."""
    n, kp = q.shape
    qp = _pad_rows(q, _round_up(n, PANEL)).view(-1, PANEL, kp // 8, 2, 4)  # [P, 16, T, half, i]
    b = qp[:, :, :, 0, :] | (qp[:, :, :, 1, :] << 4)  # [P, 16, T, 4]
    return b.permute(0, 2, 1, 3).reshape(b.shape[0], kp // 8, 64).contiguous()


def _panel_params(t: torch.Tensor) -> torch.Tensor:
    """float [N, ng] -> float [P, ng, 16] (padded rows 0)."""
    n = t.shape[0]
    tp = _pad_rows(t.to(torch.float32), _round_up(n, PANEL))
    return tp.view(-1, PANEL, t.shape[1]).permute(0, 2, 1).contiguous()


def _fp32_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).contiguous().clone()


class _Int8ActLinear(KernelLinear):
    """What W8A8Linear and W4A8Linear share: their kernels are in the int8 family."""

    _family = kernels.INT8


# ----------------------------------------------------------------------------- W8A8


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp W [N, K] -> (int8 [N, K] in [-127, 127], float32 scale [N]): symmetric per output channel."""
    wf = w.detach().to(torch.float32)
    scale = wf.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(wf / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8), scale


class W8A8Linear(_Int8ActLinear):
    """y = x @ W^T + b with W int8 per output channel and x quantized to int8 per token at each call."""

    _op = "w8a8_linear"

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, w_scale: torch.Tensor,
                 rowsum: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("packed", packed)
        self.register_buffer("w_scale", w_scale)  # [16P], padded with zeros
        self.register_buffer("rowsum", rowsum)
        self.register_buffer("bias", bias)

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> "W8A8Linear":
        """weight int8 [N, K], scale [N] (or [N, 1]) -> the packed layer (inputs not kept)."""
        n, k = weight.shape
        scale = scale.reshape(-1).to(torch.float32)
        if scale.numel() != n:
            raise QuantizationError(f"W8A8 weight scale must have {n} values (one per output channel), got {scale.numel()}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise QuantizationError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        packed, rowsum = pack_w8(weight)
        w_scale = F.pad(scale, (0, packed.shape[0] * PANEL - n)).contiguous()
        return cls(k, n, packed, w_scale, rowsum, _fp32_bias(bias))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "W8A8Linear":
        """An 8-bit symmetric per-channel QuantizedWeight (codes q = w + 128) -> the packed layer."""
        if qw.bits != 8 or qw.group_size != qw.in_features or not bool((qw.zeros == 128).all()):
            raise QuantizationError(
                f"W8A8 needs 8-bit symmetric per-channel weights, got {qw.bits} bits, group {qw.group_size}")
        return cls.from_int8((qw.q.to(torch.int16) - 128).to(torch.int8), qw.scales.reshape(-1), bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "W8A8Linear":
        q, scale = quantize_weight_int8(weight)
        return cls.from_int8(q, scale, bias)

    def int8_weight(self) -> torch.Tensor:
        """int8 [N, K] (for checks and export)."""
        return ref.unpack_w8(self.packed, self.out_features)[:, : self.in_features].contiguous()

    def dequantize(self) -> torch.Tensor:
        return self.int8_weight().float() * self.w_scale[: self.out_features, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _args(self) -> tuple:
        return self.packed, self.w_scale, self.rowsum, self.bias, self.out_features

    # ------------------------------------------------------------ large M through oneDNN (AMX-INT8)
    # Where the CPU has AMX-INT8, oneDNN's int8 GEMM (torch._int_mm) outruns the VNNI panel kernel from a
    # few dozen rows on (the default model's four linear shapes, 2 threads, Xeon with AMX: 705 vs 440
    # GFLOP/s at M = 64, 1,664 vs 464 at M = 256, 1,754 vs 342 at M = 1,024), while at decode widths
    # (M <= 16) torch._int_mm takes a slow path and the panel kernel is the one to run. The plain
    # [N, K] int8 copy it needs is unpacked from the panels at the first large call and kept: one more
    # byte per weight, on those machines only. The integer sums are exact either way and the epilogue
    # runs in the kernel's order, so both routes give bit-identical outputs.
    def _plain(self) -> torch.Tensor:
        w = self.__dict__.get("_plain_w")
        if w is None:
            w = self.__dict__["_plain_w"] = self.int8_weight()
        return w

    def _int_mm(self, x: torch.Tensor, quantize) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        q, xs = quantize(x2)
        t = torch._int_mm(q, self._plain().t()).to(torch.float32).mul_(xs.unsqueeze(1))
        ws = self.w_scale[: self.out_features]
        # the kernel's epilogue: fma(t, ws, bias), one rounding (torch.addcmul's vector loop is an FMA)
        y = t.mul_(ws) if self.bias is None else torch.addcmul(self.bias, t, ws)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _int_mm_min_m(self) -> int:
        return INT_MM_MIN_M if "amx_int8" in kernels.REGISTRY.cpu.flags else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = kernels.INT8.get()
        big = self._int_mm_min_m()
        if ext is not None and x.device.type == "cpu" and big and x.numel() >= big * self.in_features:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"expected input with {self.in_features} features, got {tuple(x.shape)}")
            return self._int_mm(x, ext.quantize_per_token)
        return super().forward(x)

    def direct(self):
        small = super().direct()
        big, ext = self._int_mm_min_m(), kernels.INT8.get()
        if not big or ext is None:
            return small
        k, quantize = self.in_features, ext.quantize_per_token
        return lambda x: self._int_mm(x, quantize) if x.numel() >= big * k else small(x)


#: From this many rows on, W8A8 multiplies through torch._int_mm on CPUs with AMX-INT8 (see above).
INT_MM_MIN_M = 32


# ----------------------------------------------------------------------------- W4A8


class W4A8Linear(_Int8ActLinear):
    """y = x @ W^T + b with W 2..4-bit codes (group scales, zero points) and x int8 with one scale per
    token and weight group (the kernel scales each group's integer sum anyway; per token alone cost
    the default model's RTN W4 g64 checkpoint 3-4% perplexity on WikiText-2, per group 0.2%)."""

    _op = "w4a8_linear"

    def __init__(self, in_features: int, out_features: int, group: int, packed: torch.Tensor,
                 scales: torch.Tensor, zero_scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group = group  # the kernel's group (the padded K for per-channel weights)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_scales", zero_scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "W4A8Linear":
        if qw.bits > 4:
            raise QuantizationError(f"W4A8 needs weights of at most 4 bits, got {qw.bits}")
        n, k = qw.q.shape
        per_channel = qw.group_size == k
        if not per_channel and qw.group_size % 8:
            raise QuantizationError(f"W4A8 needs a group size that is a multiple of 8, got {qw.group_size}")
        kp = _round_up(k, 8)
        group = kp if per_channel else qw.group_size
        q = F.pad(qw.q.to(torch.uint8), (0, kp - k))
        scales = qw.scales.to(torch.float32)
        zs = qw.zeros.to(torch.float32) * scales
        return cls(k, n, group, pack_w4(q, group), _panel_params(scales), _panel_params(zs), _fp32_bias(bias))

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> "W4A8Linear":
        """The same weights as a 4-bit-container QuantLinear (its nibbles, scales and zero points)."""
        return cls.from_quantized(quantized_weight_of(layer), layer.bias)

    def dequantize(self) -> torch.Tensor:
        codes = ref.unpack_w4(self.packed, self.out_features).float()
        ng = codes.shape[1] // self.group
        s = self.scales.permute(0, 2, 1).reshape(-1, ng)[: self.out_features]
        zs = self.zero_scales.permute(0, 2, 1).reshape(-1, ng)[: self.out_features]
        w = codes * s.repeat_interleave(self.group, 1) - zs.repeat_interleave(self.group, 1)
        return w[:, : self.in_features].contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bias={self.bias is not None}")

    def _args(self) -> tuple:
        return self.packed, self.scales, self.zero_scales, self.bias, self.out_features, self.group


def quantized_weight_of(layer: QuantLinear) -> QuantizedWeight:
    """The QuantizedWeight a 4-bit-container QuantLinear was built from (codes, scales, zeros)."""
    if layer.container_bits != 4:
        raise QuantizationError(f"only 2..4-bit QuantLinears have a W4A8 form (this one has {layer.bits} bits)")
    n, k = layer.out_features, layer.in_features
    p = layer.packed.view(n, -1, 8, 4)  # [N, chunk, j, b]: byte b of word j (see pack_nibbles)
    codes = torch.stack((p & 0xF, p >> 4), dim=-1)  # [N, chunk, j, b, half]: nibble 2b + half of word j
    codes = codes.permute(0, 1, 3, 4, 2).reshape(n, -1)[:, :k]  # weight 8 * (2b + half) + j of the chunk
    ng = layer.scales.shape[1]
    zeros = (-layer.offset).expand(n, ng) if layer.offset.numel() == 1 else -layer.offset
    return QuantizedWeight(q=codes.contiguous(), scales=layer.scales.clone(), zeros=zeros.round().to(torch.uint8),
                           bits=layer.bits, group_size=layer.group_size, sym=False)


def use_int8_activations(model: nn.Module) -> int:
    """Swaps every 4-bit-container QuantLinear of `model` for its W4A8Linear (in place); returns how
    many. 8-bit QuantLinears (the int8 LM head) stay as they are."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, QuantLinear) and child.container_bits == 4]
    for parent, name, child in swaps:
        setattr(parent, name, W4A8Linear.from_quant_linear(child))
    return len(swaps)
