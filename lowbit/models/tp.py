"""Cut a decoder into one tensor-parallel rank's slice (the plan: lowbit/distributed/partition.py).

Two entry points, one per kind of checkpoint:
* `shard_quantized` cuts a quantized checkpoint's QuantizedWeights (and their biases) by name
  before the loader fuses and packs them, so a group's scales and zeros stay with its weights;
* `shard_model` then walks the built model: it slices what is still a full-size fp nn.Linear,
  checks that every other linear already has its rank's shape, sets the attention's local head
  counts and wraps o_proj / down_proj in RowParallel (all-reduce, then the bias once).
Embeddings, norms and the LM head stay replicated. Qwen3's q/k norms are per head-dim weights
shared by every head, so they need no slicing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed.group import TPGroup
from ..distributed.partition import ShardingError, ShardPlan, balanced, ffn_unit, make_plan
from ..layers.qweight import QuantizedWeight
from ..layers.tp_linear import RowParallel, VocabParallelHead, pop_bias, slice_cols, slice_head_rows, slice_rows
from .config import ModelConfig
from .transformer import CausalLM

_COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROW = ("self_attn.o_proj", "mlp.down_proj")


def plan_for(cfg: ModelConfig, rank: int, world: int, down_group_size: int | None = None) -> ShardPlan:
    return make_plan(rank, world, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     intermediate=cfg.intermediate_size, unit=ffn_unit(cfg.intermediate_size, down_group_size))


def _row_ranges(plan: ShardPlan, leaf: str) -> list[tuple[int, int]]:
    if leaf == "q_proj":
        return [plan.q_cols]
    if leaf in ("k_proj", "v_proj"):
        return [plan.kv_rows]
    return [plan.ffn]  # gate_proj, up_proj


def _col_range(plan: ShardPlan, leaf: str) -> tuple[int, int]:
    return plan.q_cols if leaf == "o_proj" else plan.ffn


def _kind(name: str) -> tuple[str | None, str]:
    """('column' | 'row' | None, leaf name) of a checkpoint tensor name model.layers.N.<sub>.<leaf>."""
    sub = ".".join(name.split(".")[-2:])
    return ("column" if sub in _COLUMN else "row" if sub in _ROW else None), sub.split(".")[-1]


def shard_quantized(quantized: dict[str, QuantizedWeight], fp: dict[str, torch.Tensor],
                    perms: dict[str, torch.Tensor], plan: ShardPlan) -> None:
    """In place: every quantized linear (and its bias, its act-order permutation) cut to this rank."""
    for name in list(quantized):
        kind, leaf = _kind(name)
        if kind is None:
            continue
        qw = quantized[name]
        if kind == "column":
            ranges = _row_ranges(plan, leaf)
            quantized[name] = qw.take_rows(ranges)
            if f"{name}.bias" in fp:
                b = fp[f"{name}.bias"]
                fp[f"{name}.bias"] = torch.cat([b[a:c] for a, c in ranges])
            continue
        a, b = _col_range(plan, leaf)
        perm = perms.get(name)
        if perm is None:
            quantized[name] = qw.take_cols(torch.arange(a, b))
            continue
        # act-order: stored column j reads input perm[j]; keep the stored columns reading this
        # rank's inputs, in stored order (whole groups), and renumber their inputs locally
        keep = torch.nonzero((perm >= a) & (perm < b)).flatten()
        quantized[name] = qw.take_cols(keep)
        perms[name] = perm[keep] - a


def shard_model(model: CausalLM, plan: ShardPlan, group: TPGroup) -> CausalLM:
    """Cuts the model in place to `plan`'s slice; returns it."""
    cfg = model.config
    hd, lq, lkv = plan.head_dim, plan.num_q_heads, plan.num_kv_heads
    ffn = plan.ffn[1] - plan.ffn[0]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _columns(attn, {"q_proj": lq * hd, "k_proj": lkv * hd, "v_proj": lkv * hd}, "qkv_proj", plan, cfg.hidden_size)
        _columns(mlp, {"gate_proj": ffn, "up_proj": ffn}, "gate_up_proj", plan, cfg.hidden_size)
        attn.num_heads, attn.num_kv_heads = lq, lkv
        attn.o_proj = _row_parallel(attn.o_proj, "o_proj", lq * hd, cfg.q_size, plan, group)
        mlp.down_proj = _row_parallel(mlp.down_proj, "down_proj", ffn, cfg.intermediate_size, plan, group)
        mlp.intermediate_size = ffn
    model.tp_plan = plan
    model.tp_group = group
    return model


def split_lm_head(model: CausalLM) -> None:
    """Replaces a sharded model's LM head by its rank's vocabulary rows (VocabParallelHead).
    Run after any LM-head quantization; the embedding stays whole (a lookup costs no bandwidth)."""
    plan, group = model.tp_plan, model.tp_group
    sizes = balanced(model.config.vocab_size, plan.world)
    a = sum(sizes[: plan.rank])
    model.lm_head = VocabParallelHead(slice_head_rows(model.lm_head, a, a + sizes[plan.rank]), sizes, group)


def _columns(parent: nn.Module, local: dict[str, int], fused: str, plan: ShardPlan, hidden: int) -> None:
    merged = getattr(parent, fused, None)
    if merged is not None:
        _check(merged, f"{fused} rows", merged.out_features, sum(local.values()))
        return
    for leaf, rows in local.items():
        m = getattr(parent, leaf)
        if type(m) is nn.Linear and m.out_features != rows:
            setattr(parent, leaf, slice_rows(m, _row_ranges(plan, leaf)))
        else:
            _check(m, f"{leaf} rows", m.out_features, rows)


def _row_parallel(m: nn.Module, leaf: str, local: int, full: int, plan: ShardPlan, group: TPGroup) -> RowParallel:
    if isinstance(m, RowParallel):
        return m
    if type(m) is nn.Linear and m.in_features == full and local != full:
        m = slice_cols(m, *_col_range(plan, leaf))
    _check(m, f"{leaf} columns", m.in_features, local)
    return RowParallel(m, pop_bias(m), group)


def _check(m: nn.Module, what: str, got: int, want: int) -> None:
    if got != want:
        raise ShardingError(f"{type(m).__name__} has {got} {what}, this rank's slice needs {want} "
                            "(quantized linears must be cut by the loader before packing)")
