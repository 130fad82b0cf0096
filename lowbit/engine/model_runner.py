"""Runs one scheduled step: flat inputs -> model forward over the paged pool -> logits -> sampler.

Only the rows that sample pay for the LM head: the last token of a prefill that reaches the end
of its sequence, and every decode. A request with n > 1 that finishes its prompt gets its logits
row repeated n times, one draw per sample, each from that sample's own generator.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LowbitError
from ..logprobs import Logprob
from ..models.loader import LoadedModel, load_tokenizer
from ..quant.loader import load_model
from .args import EngineArgs
from .executor import execute
from .kv_cache import KVCachePool, KVCacheSpec, normalize_kv_dtype, num_blocks_for_budget
from .paged_attention import SeqSlice, build_paged_context
from .scheduler import SchedulerOutput
from .sequence import Sequence

log = logging.getLogger("lowbit.engine")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top: dict[int, Logprob] | None


@dataclass
class StepResult:
    seq: Sequence
    samples: list[SampledToken]  # one, or n for a request that forks now


def load_for_engine(spec: str | None) -> LoadedModel:
    """load_model, with the tokenizer optional: a directory without tokenizer files serves token ids."""
    loaded = load_model(spec, with_tokenizer=False)
    if any((Path(loaded.path) / f).exists() for f in _TOKENIZER_FILES):
        loaded.tokenizer = load_tokenizer(Path(loaded.path))
    return loaded


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """config.json's eos ids, generation_config.json's, and the tokenizer's."""
    ids = list(loaded.config.eos_token_ids)
    gen = Path(loaded.path) / "generation_config.json"
    if gen.exists():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids += e if isinstance(e, list) else ([e] if e is not None else [])
        except (OSError, ValueError):
            pass
    tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.append(tok_eos)
    return sorted({int(i) for i in ids})


def model_nbytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


class ModelRunner:
    def __init__(self, args: EngineArgs, loaded: LoadedModel | None = None, sampler: Callable | None = None,
                 generator: torch.Generator | None = None) -> None:
        """generator: what the default sampler draws unseeded requests from (the engine's own)."""
        self.loaded = loaded if loaded is not None else load_for_engine(args.model)
        self.model = self.loaded.model
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model.fuse_projections()
        if args.quantize_lm_head:
            self._quantize_lm_head()
        if args.activation_dtype == "int8":
            self._int8_activations()
        self.eos_token_ids = eos_token_ids(self.loaded)
        if sampler is None:
            from ..layers.sampler import Sampler

            sampler = Sampler(self.eos_token_ids, generator=generator)
        self.sampler = sampler
        cfg = self.config
        self.spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, args.block_size,
                                normalize_kv_dtype(args.kv_cache_dtype))
        self.pool = KVCachePool(self.spec, num_blocks_for_budget(self.spec, args.kv_cache_memory))
        self.window = cfg.sliding_window
        log.info(
            "KV cache %s: %d blocks x %d tokens = %d tokens, pool %.1f MiB (%d B/token); model %.1f MiB",
            self.spec.dtype, self.pool.num_blocks, self.pool.block_size, self.pool.num_tokens,
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
    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        if step.copies:
            self.pool.copy_blocks([s for s, _ in step.copies], [d for _, d in step.copies])
        items: list[SeqSlice] = []
        ids: list[int] = []
        sample_rows: list[int] = []
        samplers: list[tuple[Sequence, int]] = []  # (seq, number of draws)
        row = 0
        for s in step.scheduled:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new
            items.append(SeqSlice(seq.block_table, start, n))
            if n == 1:
                ids.append(seq.token_ids[start])
            else:
                ids.extend(seq.token_ids[start : start + n])
            row += n
            if s.samples:
                draws = 1 if seq.group.forked else seq.group.n
                sample_rows.extend([row - 1] * draws)
                samplers.append((seq, draws))
        ctx = build_paged_context(self.pool, items, self.window)
        hidden = execute(self.model, torch.tensor(ids, dtype=torch.long), ctx.positions, ctx)
        if not samplers:
            return []
        if len(sample_rows) != row or sample_rows != list(range(row)):
            hidden = hidden[torch.tensor(sample_rows, dtype=torch.long)]
        logits = self.model.compute_logits(hidden)
        params, prompts, outputs, gens = [], [], [], []
        for seq, draws in samplers:
            for i in range(draws):
                params.append(seq.params)
                prompts.append(seq.prompt_token_ids)
                outputs.append(seq.output_token_ids)
                gens.append(seq.generator if draws == 1 else seq.group.generators[i])
        out = self.sampler(logits, params, prompts, outputs, gens)
        tokens = out.token_ids.tolist()
        lps = out.sampled_logprob.tolist()
        tops: list[Any] = out.logprobs if out.logprobs is not None else [None] * len(tokens)
        results, k = [], 0
        for seq, draws in samplers:
            results.append(StepResult(seq, [SampledToken(tokens[j], lps[j], tops[j]) for j in range(k, k + draws)]))
            k += draws
        return results
