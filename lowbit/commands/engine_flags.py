"""Engine flags shared by generate, chat, serve and bench: one definition, one conversion to EngineArgs."""
from __future__ import annotations

import argparse
import re

from ..engine.args import DTYPES, KV_CACHE_DTYPES, EngineArgs

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB', '1.5GiB', '800000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF model dir, .gguf file, hub id, or 'smollm2-135m' (default: the built-in default model)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Tensor parallelism (lowbit/engine/tp/, docs/parallel.md)."""
    d = EngineArgs()
    g = p.add_argument_group("tensor parallelism")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size, metavar="N",
                   help="slice the model over N processes (default 1); each gets cores/N threads")
    g.add_argument("--nnodes", type=int, default=d.nnodes, help="machines the N ranks span (default 1)")
    g.add_argument("--node-rank", type=int, default=d.node_rank, help="this machine's index (node 0 runs the engine)")
    g.add_argument("--master-addr", default=None, help="node 0's address (default 127.0.0.1 or $MASTER_ADDR)")
    g.add_argument("--master-port", type=int, default=None, help="node 0's port (default: free, or $MASTER_PORT)")


def parallel_kwargs(args: argparse.Namespace) -> dict:
    return dict(tensor_parallel_size=args.tensor_parallel_size, nnodes=args.nnodes, node_rank=args.node_rank,
                master_addr=args.master_addr, master_port=args.master_port)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineArgs()
    add_parallel_args(p)
    g = p.add_argument_group("engine")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=d.kv_cache_memory,
                   help="bytes for the paged KV-cache pool, e.g. 512MiB (default %(default)s)")
    g.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=d.kv_cache_dtype,
                   help="auto follows --dtype (float32 -> fp32, bfloat16 -> bf16) (default %(default)s)")
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    g.add_argument("--quantize-lm-head", action="store_true", help="int8 embedding / LM head")
    g.add_argument("--activation-dtype", choices=["auto", "int8"], default=d.activation_dtype,
                   help="int8: 4-bit weight checkpoints run their matmuls on int8 per-token activations (W4A8); "
                        "auto (default): fp32 activations, int8 for W8A8 checkpoints")
    g.add_argument("--dtype", choices=list(DTYPES), default=d.dtype,
                   help="matrix multiplies in float32, or bfloat16 with fp32 accumulation (activations, attention "
                        "and the KV cache stay fp32); auto (default): bfloat16 where the CPU has native bf16 "
                        "(AVX512_BF16, AMX-BF16), else float32")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores); process-wide, so set by the command line (cli.py), "
                        "not by the engine")


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=args.model,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        quantize_lm_head=args.quantize_lm_head,
        activation_dtype=getattr(args, "activation_dtype", "auto"),
        dtype=getattr(args, "dtype", "auto"),
        **parallel_kwargs(args),
    )


def worker_engine_args(args: argparse.Namespace) -> EngineArgs:
    """What a worker node (node rank > 0) builds its ranks from: the command's engine flags, or the
    engine defaults for a command without them (eval ppl), exactly as node 0 does."""
    if hasattr(args, "kv_cache_memory"):
        return engine_args_from(args)
    from ..eval.perplexity import ppl_engine_args

    return ppl_engine_args(args.model, dtype=getattr(args, "dtype", "float32"), **parallel_kwargs(args))
