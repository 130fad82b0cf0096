"""Runs one scheduled step: flat inputs -> model forward over the paged pool -> logits -> sampler.

Only the rows that sample pay for the LM head: the last token of a prefill that reaches the end
of its sequence, and every decode. A request with n > 1 that finishes its prompt gets its logits
row repeated n times, one draw per sample, each from that sample's own generator.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..distributed.group import TPGroup
from ..errors import LowbitError
from ..logprobs import Logprob
from ..models.loader import LoadedModel, load_tokenizer
from ..quant.loader import load_model
from .args import EngineArgs, resolve_dtype
from .model_shard import ModelShard, StepInputs, model_nbytes  # noqa: F401 (model_nbytes: re-exported)
from .paged_attention import SeqSlice
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


def load_for_engine(spec: str | None, tp: TPGroup | None = None) -> LoadedModel:
    """load_model, with the tokenizer optional: a directory without tokenizer files serves token ids.
    tp: load only that tensor-parallel rank's slice."""
    loaded = load_model(spec, with_tokenizer=False, tp=tp)
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


class ModelRunner:
    def __init__(self, args: EngineArgs, loaded: LoadedModel | None = None, sampler: Callable | None = None,
                 generator: torch.Generator | None = None) -> None:
        """generator: what the default sampler draws unseeded requests from (the engine's own)."""
        self.tp = None
        # dtype auto resolved once, here: the ranks this process starts get the driver's choice
        args = replace(args, dtype=resolve_dtype(args.dtype))
        if args.tensor_parallel_size > 1:
            from .tp.launch import start_tensor_parallel

            if loaded is not None:
                raise LowbitError("tensor_parallel_size > 1 loads the model on every rank: pass the model path, "
                                  "not a loaded model")
            self.tp = start_tensor_parallel(args)  # workers started; this process is rank 0
        try:
            self._build(args, loaded, sampler, generator)
        except BaseException:
            self.close()
            raise

    def _build(self, args: EngineArgs, loaded: LoadedModel | None, sampler: Callable | None,
               generator: torch.Generator | None) -> None:
        if loaded is None:
            loaded = load_for_engine(args.model, None if self.tp is None else self.tp.group)
        self.loaded = loaded
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.shard = ModelShard(args, self.loaded)
        self.eos_token_ids = eos_token_ids(self.loaded)
        if sampler is None:
            from ..layers.sampler import Sampler

            sampler = Sampler(self.eos_token_ids, generator=generator)
        self.sampler = sampler
        if self.tp is not None:
            self.tp.wait_ready()  # every worker loaded its slice (or a one-line error)

    @property
    def model(self) -> torch.nn.Module:
        return self.shard.model

    @property
    def spec(self):
        return self.shard.spec

    @property
    def pool(self):
        return self.shard.pool

    def _on_all_ranks(self, fn: Callable[[StepInputs], Any], inputs: StepInputs) -> Any:
        """fn(inputs) on this rank, every other rank running the same step (broadcast first)."""
        return fn(inputs) if self.tp is None else self.tp.run_step(fn, inputs)

    def close(self) -> None:
        """Stops the tensor-parallel workers (nothing to do with one rank)."""
        if self.tp is not None:
            self.tp.close()

    @torch.inference_mode()
    def forward_window(self, ids: list[int]) -> torch.Tensor:
        """Final hidden states [T, H] of one fresh sequence, run as a single prefill on blocks 0..
        of the pool over every rank (perplexity under tensor parallelism; no scheduler involved)."""
        nb = (len(ids) + self.pool.block_size - 1) // self.pool.block_size
        if nb > self.pool.num_blocks:
            raise LowbitError(f"a window of {len(ids)} tokens needs {nb} KV blocks; the pool has {self.pool.num_blocks}")
        return self._on_all_ranks(self.shard.forward, StepInputs([], [SeqSlice(list(range(nb)), 0, len(ids))], list(ids)))

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[StepResult]:
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
        logits = self._on_all_ranks(self.shard.run, StepInputs(list(step.copies), items, ids,
                                                               sample_rows if samplers else None))
        if not samplers:
            return []
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
