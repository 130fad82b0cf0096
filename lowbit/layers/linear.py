"""Weight-only quantized linear and embedding layers for fast CPU decode.

Why this exists: at decode time (one token, M = 1) a linear layer is a matrix-vector product
whose cost is the bytes of weight streamed from memory. Storing W as 4-bit (or 8-bit) integers
cuts those bytes 8x (4x), but only if the kernel turns integers back into fp32 products faster
than memory delivers them. PyTorch's own packed-int matmuls vectorize only bf16/fp16 inputs on
x86 and fall back to a scalar loop for fp32 (10-100x slower than fp32 BLAS; see
benchmarks/bench_kernels.py), so we repack into layouts read by our AVX2 kernels
(lowbit/kernels/csrc/qgemm/) and keep a pure-torch path for machines without a compiler.

Containers: 2/3/4-bit weights are stored one value per nibble (exact: q < 16), 5..8-bit one
value per byte. No fp32 copy of W is ever kept; the pure-torch path dequantizes a bounded block
of rows at a time.

Precision: activations stay fp32 between layers. Inside the gemv kernel (decode, 1-12 rows, W
streamed once per 4 rows) x is rounded to int16 with one step per 64 inputs (max |x| of those 64
/ 32767) so the products are exact integer multiply-adds (vpmaddwd); the result is exactly
W x_rounded, off by at most sum |w| step / 2 (~1e-5 relative, tighter than the fp16 activations
of GPU W4A16 kernels) and 1.4-1.5x faster. `forward_mode(x, 4)` runs the fp32-x gemv; groups of
32 and non-finite x always use it (groups of 32 only at M = 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import QuantizationError
from lowbit import kernels
from lowbit.layers.qweight import QuantizedWeight

#: From this many activation rows on (prefill chunks, wide decode batches) the kernel dequantizes
#: W tile by tile into fp32 scratch and hands it to the BLAS sgemm instead of running its own
#: AVX2 register-tiled loop: compute-bound there, the BLAS uses the machine's widest SIMD.
#: Measured with benchmarks/bench_kernels.py --modes (2 threads, the default model's shapes): at
#: M = 16 the blocked kernel wins clearly, at M = 32 the two are even (gate/up 305 vs 312 us,
#: down 288 vs 304), at M = 64 the sgemm path wins by 1.3-1.5x, at M = 1024 by 1.7-2x. Re-measured
#: cold (every linear of the default model in turn, as a decode step runs them) once the sgemm
#: path split its tiles evenly over the threads: even at M = 8 and 16, sgemm 1.28x at M = 32.
TILE_MIN_M = 32

#: Pure-torch fallback: rows dequantized at once (bounds its transient fp32 memory) and the
#: largest M for which PyTorch's int8 weight-only matmul beats dequantize + sgemm.
_FALLBACK_ROWS_BYTES = 1 << 20
_FALLBACK_INT8PACK_MAX_M = 4


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _validate(qw: QuantizedWeight) -> None:
    """Rejects parameters no kernel can represent, with a message a user can act on."""
    if not 2 <= qw.bits <= 8:
        raise QuantizationError(f"QuantLinear supports 2..8-bit weights, got bits={qw.bits}")
    if qw.q.dim() != 2 or qw.q.numel() == 0:
        raise QuantizationError(f"quantized weight must be a non-empty 2-D tensor, got shape {tuple(qw.q.shape)}")
    n, k = qw.q.shape
    g = qw.group_size
    if g <= 0 or k % g:
        raise QuantizationError(f"group_size {g} does not divide in_features {k}")
    if g != k and g % 8:
        raise QuantizationError(
            f"group_size {g} must be a multiple of 8 (or equal in_features for per-channel); "
            "the kernels process 8 weights per vector"
        )
    expect = (n, k // g)
    if tuple(qw.scales.shape) != expect or tuple(qw.zeros.shape) != expect:
        raise QuantizationError(
            f"scales/zeros must have shape {expect}, got {tuple(qw.scales.shape)} / {tuple(qw.zeros.shape)}"
        )
    qmax = (1 << qw.bits) - 1
    if int(qw.q.max()) > qmax or int(qw.zeros.max()) > qmax:
        raise QuantizationError(f"quantized values exceed the {qw.bits}-bit range [0, {qmax}]")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (K % 64 == 0, values < 16) -> uint8 [N, K/2] in the kernel's chunk layout.

    Each 64-weight chunk becomes 8 little-endian uint32 words; nibble i of word j holds weight
    8*i + j of the chunk, so one mask (or shift) gives 8 consecutive weights in SIMD lane order.
    Byte b of word j therefore holds nibble 2b (low half) and 2b+1 (high half).
    """
    n, k = q.shape
    c = q.reshape(n, k // 64, 4, 2, 8)  # [N, chunk, b, half, j]
    packed = c[:, :, :, 0, :] | (c[:, :, :, 1, :] << 4)  # [N, chunk, b, j]
    return packed.transpose(2, 3).reshape(n, k // 2).contiguous()  # bytes ordered (j, b)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as 2..8-bit integers, group-wise scale and zero point.

    Build it with QuantLinear.from_quantized(qw, bias). Activations are fp32 (the fast CPU
    path); other float dtypes are computed in fp32 and cast back.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        packed: torch.Tensor,
        scales: torch.Tensor,
        offset: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.container_bits = 4 if bits <= 4 else 8
        self.k8 = _round_up(in_features, 8)
        # Per-channel groups cover the padded row so the padding never starts a new group.
        self.kernel_group = self.k8 if group_size == in_features else group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", bias)
        self._handle: object | None = None
        self._order: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bf16_min_m = 0  # > 0: from this many rows on the matmul runs in bf16 (layers/linear_bf16.py)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Repacks a QuantizedWeight into the kernel layout (the input tensors are not kept).

        4-bit container: nibbles in the chunk layout, offset = -zero.
        5..8-bit container: int8 (q - 2^(bits-1)), offset = 2^(bits-1) - zero (0 when symmetric);
        signed storage lets PyTorch's int8 weight-only matmul (the fallback) and a tied embedding
        read the same bytes.
        """
        _validate(qw)
        n, k = qw.q.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise QuantizationError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        q = qw.q.to(torch.uint8)
        zeros = qw.zeros.to(torch.float32)
        if qw.bits <= 4:
            packed = pack_nibbles(F.pad(q, (0, _round_up(k, 64) - k)))
            offset = -zeros
        else:
            center = 1 << (qw.bits - 1)  # centring keeps (stored + offset) free of cancellation
            packed = F.pad((q.to(torch.int16) - center).to(torch.int8), (0, _round_up(k, 8) - k)).contiguous()
            offset = center - zeros
        # One shared offset (symmetric quantization) costs no per-group memory traffic.
        if bool((offset == offset.flatten()[0]).all()):
            offset = offset.flatten()[:1].clone()  # clone: a view would pin the [N, ng] tensor
        scales = qw.scales.to(torch.float32).contiguous().clone()
        b = None if bias is None else bias.detach().to(torch.float32).contiguous().clone()
        return cls(k, n, qw.bits, qw.group_size, packed, scales, offset.contiguous(), b)

    # ---------------------------------------------------------------- inspection
    def weight_bytes(self) -> int:
        """Resident bytes of this layer: packed weight + scales + offsets + bias."""
        tensors = (self.packed, self.scales, self.offset, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    # ---------------------------------------------------------------- pure-torch path
    # The fallback works in "storage order": 4-bit weights are unpacked byte by byte (low nibble,
    # high nibble) with no transpose, and the activations are permuted to match instead, which
    # is M x K work rather than N x K.
    def _storage_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(column of x for each stored position, group of each stored position), cached."""
        if self._order is None:
            if self.container_bits == 4:
                k64 = self.packed.shape[1] * 2
                c, j, b, h = torch.meshgrid(
                    torch.arange(k64 // 64), torch.arange(8), torch.arange(4), torch.arange(2), indexing="ij"
                )
                cols = (64 * c + 8 * (2 * b + h) + j).flatten()
            else:
                cols = torch.arange(self.k8)
            groups = (cols // self.kernel_group).clamp_(max=self.scales.shape[1] - 1)
            self._order = (cols, groups)
        return self._order

    def _dequant_rows(self, r0: int, r1: int) -> torch.Tensor:
        """fp32 W[r0:r1] in storage order: (stored + offset) * scale, via pure torch."""
        p = self.packed[r0:r1]
        if self.container_bits == 4:
            p = torch.stack((p & 0xF, p >> 4), dim=-1).view(r1 - r0, -1)
        _, groups = self._storage_order()
        s = self.scales[r0:r1].index_select(1, groups)
        if self.offset.numel() == 1:
            return (p.to(torch.float32) + self.offset) * s
        off = (self.offset[r0:r1] * self.scales[r0:r1]).index_select(1, groups)
        return torch.addcmul(off, p.to(torch.float32), s)

    def _x_storage_order(self, x2: torch.Tensor) -> torch.Tensor:
        """Activations [M, in] padded and permuted to the storage order of the weights."""
        cols, _ = self._storage_order()
        x2 = F.pad(x2, (0, cols.numel() - x2.shape[1]))
        return x2 if self.container_bits == 8 else x2.index_select(1, cols)

    def dequantize(self) -> torch.Tensor:
        """fp32 W [out, in] (for checks and export; never kept by the layer)."""
        ext = kernels.get()
        if ext is not None:
            w = ext.dequantize(self.packed, self.scales, self.offset, self.container_bits, self.k8, self.kernel_group)
            return w[:, : self.in_features].contiguous()
        cols, _ = self._storage_order()
        w = torch.zeros(self.out_features, cols.numel())
        w[:, cols] = self._dequant_rows(0, self.out_features)
        return w[:, : self.in_features].contiguous()

    # ---------------------------------------------------------------- compute
    def _bind(self) -> object:
        """The compiled layer handle, or False for the pure-torch path.

        Cached in a plain attribute: looking buffers up through nn.Module.__getattr__ and
        converting eleven arguments would cost microseconds per call, paid by ~200 linears per
        token in a small model.
        """
        ext = kernels.get()
        self._handle = False if ext is None else ext.QLinear(
            self.packed, self.scales, self.offset, self.bias,
            self.container_bits, self.in_features, self.k8, self.kernel_group, TILE_MIN_M,
        )
        if self._handle is not False:
            self._handle.bf16_min_m = self.bf16_min_m
        return self._handle

    def set_bf16_min_m(self, m: int) -> None:
        """From m rows on (0: never) multiply in bf16 with fp32 accumulation (EngineArgs.dtype)."""
        self.bf16_min_m = int(m)
        self._handle = None

    def _apply(self, fn, recurse=True):  # noqa: D401 - torch API
        """Module.to()/half()/bfloat16() move buffers but must not change their dtypes: the
        kernels read int codes and fp32 scales whatever the activation dtype. Also drops the
        bound handle, whose raw pointers would dangle."""
        self._handle = None

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where fn would send t
            return t if target.device == t.device else t.to(device=target.device)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch API
        """Loading may swap buffers of another shape: drop the bound handle."""
        self._handle = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] (computed in fp32, returned in x.dtype)."""
        handle = self._handle or self._bind()
        if handle is not False:
            return handle.forward(x)
        return self._forward_fallback(x)

    def forward_mode(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        """forward with a forced kernel (benchmarks, tests): 0 auto, 1 gemv row by row (int16 x
        where the groups allow; the default up to 12 rows), 2 blocked, 3 tiled sgemm, 4 gemv with
        fp32 x."""
        handle = self._handle or self._bind()
        if handle is not False:
            return handle.forward_mode(x, mode)
        return self._forward_fallback(x)

    def _forward_fallback(self, x: torch.Tensor) -> torch.Tensor:
        """Pure torch, exact. Per-channel 8-bit at small M uses PyTorch's int8 weight-only
        matmul on our int8 bytes; everything else dequantizes a bounded block of rows at a time
        and calls sgemm (slow at M = 1: the reason the extension exists)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {tuple(x.shape)}")
        x2 = self._x_storage_order(x.reshape(-1, self.in_features).to(torch.float32)).contiguous()
        per_channel8 = self.container_bits == 8 and self.scales.shape[1] == 1
        if per_channel8 and x2.shape[0] <= _FALLBACK_INT8PACK_MAX_M:
            out = torch.ops.aten._weight_int8pack_mm(x2, self.packed, self.scales[:, 0])
            if bool((self.offset != 0).any()):
                out += x2.sum(dim=1, keepdim=True) * (self.offset.view(-1) * self.scales[:, 0])
        else:
            rows = max(1, _FALLBACK_ROWS_BYTES // (4 * x2.shape[1]))
            out = x2.new_empty(x2.shape[0], self.out_features)
            bf16 = 0 < self.bf16_min_m <= x2.shape[0]
            xb = x2.to(torch.bfloat16) if bf16 else x2
            for r0 in range(0, self.out_features, rows):
                r1 = min(self.out_features, r0 + rows)
                w = self._dequant_rows(r0, r1)
                out[:, r0:r1] = (xb @ w.to(torch.bfloat16).t()).float() if bf16 else xb @ w.t()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def __getstate__(self) -> dict:
        """Pickle/deepcopy without the bound extension handle (not picklable)."""
        state = self.__dict__.copy()
        state["_handle"] = None
        return state


class QuantEmbedding(nn.Module):
    """Embedding table stored as per-row symmetric int8; lookup dequantizes only the rows used.

    When built by quantize_embedding it shares its int8 storage with the quantized LM head, so
    a tied embedding costs its int8 bytes once.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = q.shape[0]
        self.embedding_dim = embedding_dim
        self.register_buffer("q", q)  # int8 [vocab, >= dim]
        self.register_buffer("scales", scales)  # float32 [vocab, 1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.q[ids, : self.embedding_dim].to(torch.float32)
        return rows * self.scales[ids]

    def weight_bytes(self) -> int:
        """Resident bytes (shared with the tied LM head when built by quantize_embedding)."""
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()


def quantize_embedding(weight: torch.Tensor) -> tuple[QuantEmbedding, QuantLinear]:
    """fp32 [vocab, hidden] -> (int8 embedding, int8 LM head) sharing one int8 table.

    Per-row symmetric int8 (scale = absmax / 127) keeps logits within ~0.5% of fp32 while
    cutting the LM head's bytes per token 4x; for small models the tied head dominates decode.
    """
    if weight.dim() != 2 or weight.numel() == 0:
        raise QuantizationError(f"embedding weight must be a non-empty 2-D tensor, got {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    vocab, hidden = w.shape
    scales = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    q = (torch.round(w / scales).clamp_(-127, 127) + 128).to(torch.uint8)
    qw = QuantizedWeight(
        q=q, scales=scales, zeros=torch.full((vocab, 1), 128, dtype=torch.uint8),
        bits=8, group_size=hidden, sym=True,
    )
    head = QuantLinear.from_quantized(qw, None)
    emb = QuantEmbedding(head.packed, head.scales, hidden)  # same tensors: no second copy
    return emb, head
