"""Fake (meta) implementations of the dispatcher ops, for torch.compile.

torch.compile traces with tensors that have shapes but no data; for a custom op it needs a function
that produces outputs of the right shape and dtype without running the kernel. One set serves
every variant's namespace (lowbit_avx2, lowbit_avx512): the schemas are the same.
"""
from __future__ import annotations

import torch

_registered: set[str] = set()


def register(namespace: str) -> None:
    """Registers the fakes of one variant's ops (once per process: the dispatcher keeps them)."""
    if namespace in _registered:
        return
    _registered.add(namespace)

    def fake(name: str):
        return torch.library.register_fake(f"{namespace}::{name}")

    @fake("qlinear")
    def _qlinear(x, packed, scales, offset, bias, bits, in_features, k8, group, tile_min_m, mode):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    @fake("dequantize")
    def _dequantize(packed, scales, offset, bits, k8, group):
        return scales.new_empty((packed.shape[0], k8))

    @fake("bf16_linear")
    def _bf16_linear(x, w, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype)

    @fake("quantize_per_token")
    def _quantize_per_token(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1])

    @fake("w8a8_linear")
    def _w8a8_linear(x, packed, w_scale, rowsum, bias, out_features):
        return x.new_empty((*x.shape[:-1], out_features))

    @fake("w4a8_linear")
    def _w4a8_linear(x, packed, scales, zero_scales, bias, out_features, group):
        return x.new_empty((*x.shape[:-1], out_features))

    @fake("rms_norm")
    def _rms_norm(x, w, eps):
        return x.new_empty(x.shape)

    @fake("fused_add_rms_norm")
    def _fused_add_rms_norm(x, residual, w, eps):
        return x.new_empty(x.shape)

    @fake("silu_and_mul")
    def _silu_and_mul(x):
        return x.new_empty((x.shape[0], x.shape[1] // 2))

    @fake("paged_decode_attention")
    def _paged_decode_attention(q, k_pool, v_pool, k_sz, v_sz, block_tables, context_lens, scale, window, kv_dtype):
        return q.new_empty(q.shape)

    @fake("paged_decode_attention_qkv")
    def _paged_decode_attention_qkv(qkv, Hq, Hkv, B, k_pool, v_pool, k_sz, v_sz, block_tables, context_lens,
                                    scale, window, kv_dtype):
        return qkv.new_empty((B, Hq * (qkv.shape[1] // (Hq + 2 * Hkv))))

    def _in_place(*_args) -> None:  # the ops that only write their (a!) arguments return nothing
        return None

    for name in ("rotary_", "rotary_and_cache", "rotary_qkv_", "rotary_and_cache_qkv", "quantize_to_pool"):
        fake(name)(_in_place)
