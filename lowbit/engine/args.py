"""EngineArgs: every knob of the engine, shared by LLM, AsyncEngine, the CLI and the server."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import LowbitError


#: EngineArgs.dtype values (vLLM's --dtype names; "float"/"bf16" are not accepted aliases).
DTYPES = ("auto", "float32", "bfloat16")
#: EngineArgs.kv_cache_dtype values: auto (as the matrix dtype resolves) or a pool dtype (engine/kv_cache.py)
KV_CACHE_DTYPES = ("auto", "fp32", "bf16", "int8", "int4")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LowbitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def resolve_dtype(dtype: str) -> str:
    """auto -> bfloat16 where bf16 matrix work is native and compiled kernels run, else float32.

    LOWBIT_DTYPE=float32|bfloat16 overrides what auto means on this machine (as LOWBIT_ISA does for the
    kernels), for every process it reaches: the test suite sets float32, because its exactness checks
    compare against fp32 references, and asks for bfloat16 explicitly where it tests that path.
    """
    _check_dtype(dtype)
    if dtype != "auto":
        return dtype
    forced = os.environ.get("LOWBIT_DTYPE", "").strip()
    if forced:
        if forced not in DTYPES[1:]:
            raise LowbitError(f"LOWBIT_DTYPE={forced!r}: expected float32 or bfloat16")
        return forced
    from .. import kernels

    return "bfloat16" if kernels.native_bf16() and kernels.available() else "float32"


@dataclass
class EngineArgs:
    model: str | None = None  # None -> built-in default model
    kv_cache_memory: int = 512 * 2**20  # bytes for the paged KV pool (all layers, K and V)
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 1024  # per-step token budget (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # auto: as the matrix dtype resolves (float32 -> fp32, bfloat16 -> bf16) | fp32 | bf16 | int8 | int4
    kv_cache_dtype: str = "auto"
    quantize_lm_head: bool = False  # int8 embedding/LM head
    # auto: as the checkpoint says (fp32 activations; int8 for W8A8 checkpoints); int8: 4-bit weight
    # checkpoints (AWQ, RTN, GPTQ) run their matmuls on int8 per-token activations too (W4A8)
    activation_dtype: str = "auto"
    # the matrix multiplies: float32, or bfloat16 with fp32 accumulation (activations between layers
    # and attention stay fp32; the KV cache follows it under kv_cache_dtype auto); auto: bfloat16
    # where the CPU has native bf16 dot products (AVX512_BF16 or AMX-BF16) and the compiled kernels
    # are in use, else float32
    dtype: str = "auto"
    session_ttl: float = 600.0  # seconds an idle session keeps its KV cache
    max_sessions: int = 256
    seed: int = 0  # seeds the engine's own generator, which unseeded requests draw from
    tensor_parallel_size: int = 1  # ranks the model is sliced over (lowbit/engine/tp/)
    nnodes: int = 1  # machines those ranks span (each runs tensor_parallel_size / nnodes ranks)
    node_rank: int = 0  # this machine's index; node 0 runs the engine (rank 0)
    master_addr: str | None = None  # where node 0 listens (default 127.0.0.1, or $MASTER_ADDR)
    master_port: int | None = None  # its port (default: a free one on one machine, or $MASTER_PORT)
    vocab_parallel_head: bool = True  # under TP, each rank computes its slice of the logits (else rank 0 all)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LowbitError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.activation_dtype not in ("auto", "int8"):
            raise LowbitError(f"activation_dtype must be auto or int8, got {self.activation_dtype!r}")
        _check_dtype(self.dtype)
        if self.block_size not in (8, 16, 32, 64, 128):
            raise LowbitError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.block_size:
            raise LowbitError("max_num_seqs must be >= 1 and max_num_batched_tokens >= block_size")
        if self.tensor_parallel_size < 1 or self.nnodes < 1:
            raise LowbitError("tensor_parallel_size and nnodes must be >= 1")
        if self.kv_cache_memory < 2**20:
            raise LowbitError(f"kv_cache_memory must be at least 1 MiB, got {self.kv_cache_memory} bytes")
