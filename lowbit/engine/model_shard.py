"""One rank's model and KV pool, and the forward of a step's flat inputs over them.

Split out of the ModelRunner so the tensor-parallel workers (lowbit/engine/tp/worker.py) run
exactly the code the driver runs: the driver's ModelRunner owns a ModelShard plus the sampler,
a worker owns only a ModelShard. With one rank, the shard is the whole model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..errors import LowbitError
from ..models.loader import LoadedModel
from ..models.tp import split_lm_head
from .args import EngineArgs, resolve_dtype
from .executor import execute
from .kv_cache import KVCachePool, KVCacheSpec, normalize_kv_dtype, num_blocks_for_budget
from .paged_attention import SeqSlice, build_paged_context

log = logging.getLogger("lowbit.engine")


@dataclass
class StepInputs:
    """What every rank needs to run one step: the block copies (copy-on-write) and the step's flat
    tokens (the driver broadcasts this; positions, slots and masks are rebuilt on each rank)."""

    copies: list[tuple[int, int]]
    items: list[SeqSlice]
    ids: list[int]
    sample_rows: list[int] | None = None  # rows whose logits the sampler needs (None: no logits)

    def __reduce__(self):
        """Pickled as plain lists and tuples (the step broadcast): 3-4x cheaper than dataclasses."""
        return (_from_wire, (self.copies, [(s.block_table, s.start, s.num_new) for s in self.items], self.ids,
                             self.sample_rows))


def _from_wire(copies, items, ids, sample_rows) -> StepInputs:
    return StepInputs(copies, [SeqSlice(*it) for it in items], ids, sample_rows)


def model_nbytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


class ModelShard:
    def __init__(self, args: EngineArgs, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.config = cfg = loaded.config
        self.plan = loaded.shard
        self.model.fuse_projections()
        if args.quantize_lm_head:
            self._quantize_lm_head()
        if args.activation_dtype == "int8":
            self._int8_activations()
        self.dtype = resolve_dtype(args.dtype)
        heads = cfg.num_kv_heads if self.plan is None else self.plan.num_kv_heads
        self.spec = KVCacheSpec(cfg.num_layers, heads, cfg.head_dim, args.block_size,
                                normalize_kv_dtype(args.kv_cache_dtype, self.dtype))
        # every rank gets the same number of blocks (the driver hands out one set of block ids):
        # the budget is per rank, and the rank holding the most KV heads decides
        sizing = self.spec if self.plan is None else replace(self.spec, num_kv_heads=self.plan.max_kv_heads)
        self.pool = KVCachePool(self.spec, num_blocks_for_budget(sizing, args.kv_cache_memory))
        self.window = cfg.sliding_window
        # a vocabulary-parallel LM head: every rank computes its slice of each step's logits
        self.head_parallel = self.plan is not None and args.vocab_parallel_head
        if self.head_parallel:
            split_lm_head(self.model)
        # last: the fp linears it swaps are the sharded ones, the vocabulary-parallel head's slice included
        if self.dtype == "bfloat16":
            self._bf16()
        where = "" if self.plan is None else f"rank {self.plan.rank}/{self.plan.world}: "
        log.info(
            "%sKV cache %s: %d blocks x %d tokens = %d tokens, %d KV heads, pool %.1f MiB (%d B/token); model %.1f MiB",
            where, self.spec.dtype, self.pool.num_blocks, self.pool.block_size, self.pool.num_tokens, heads,
            self.pool.nbytes() / 2**20, self.spec.bytes_per_block // self.spec.block_size,
            model_nbytes(self.model) / 2**20,
        )

    def _int8_activations(self) -> None:
        """W4A8: every 4-bit QuantLinear runs on int8 activations (W8A8 checkpoints already do)."""
        from ..layers.linear_int8 import W8A8Linear, use_int8_activations

        swapped = use_int8_activations(self.model)
        if not swapped and not any(isinstance(m, W8A8Linear) for m in self.model.modules()):
            raise LowbitError("activation_dtype int8 needs a 4-bit weight checkpoint (AWQ, RTN, GPTQ) or a W8A8 "
                              "(SmoothQuant) one; this model has neither")
        log.info("int8 activations: %d linears switched to W4A8", swapped)

    def _bf16(self) -> None:
        """bf16 matrix work, fp32 accumulation (layers/linear_bf16.py)."""
        from .. import kernels
        from ..layers.linear_bf16 import use_bf16

        dense, quant = use_bf16(self.model)
        log.info("dtype bfloat16: %d fp linears stored as bf16, %d quantized linears multiply in bf16%s", dense, quant,
                 "" if kernels.native_bf16() else " (this CPU has no native bf16: expect it to be slower than float32)")

    def _quantize_lm_head(self) -> None:
        from ..layers.linear import quantize_embedding

        m = self.model
        emb = m.model.embed_tokens
        if not isinstance(emb, torch.nn.Embedding):
            return
        tied = isinstance(m.lm_head, torch.nn.Linear) and m.lm_head.weight is emb.weight
        q_emb, q_head = quantize_embedding(emb.weight)
        m.model.embed_tokens = q_emb
        if tied:
            m.lm_head = q_head
        elif isinstance(m.lm_head, torch.nn.Linear):
            m.lm_head = quantize_embedding(m.lm_head.weight)[1]

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor | None:
        """forward, then the logits of step.sample_rows: on rank 0 the full rows; on other ranks
        their vocabulary slice goes to rank 0 (None returned), or nothing when the head is replicated."""
        hidden = self.forward(step)
        rows = step.sample_rows
        if rows is None or (self.plan is not None and self.plan.rank != 0 and not self.head_parallel):
            return None
        if len(rows) != hidden.shape[0] or rows != list(range(hidden.shape[0])):
            hidden = hidden[torch.tensor(rows, dtype=torch.long)]
        logits = self.model.compute_logits(hidden)
        return logits if self.plan is None or self.plan.rank == 0 else None

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Final hidden states of the step's flat tokens (the KV pool updated)."""
        if step.copies:
            self.pool.copy_blocks([s for s, _ in step.copies], [d for _, d in step.copies])
        ctx = build_paged_context(self.pool, step.items, self.window)
        return execute(self.model, torch.tensor(step.ids, dtype=torch.long), ctx.positions, ctx)
