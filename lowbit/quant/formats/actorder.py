"""Activation-ordered weights: their stored form (g_idx) and lowbit's group-contiguous layout.

GPTQ with act order ("desc_act" in AutoGPTQ/GPTQModel, actorder "group" in compressed-tensors)
forms its groups in a permuted column order. Checkpoints keep the codes in the original column
order and map each input channel c to its group through g_idx[c]; a kernel that honours g_idx
looks a scale up per element, which is why act-order GPTQ is slow to dequantize.

lowbit never does that. At load the columns are sorted by group (perm = stable argsort of g_idx,
so W[:, perm] is group-contiguous) and the layer computes W[:, perm] @ x[perm]: the permutation
moves to the activations, one gather of `in` values per token and linear, and the kernels see
an ordinary group-quantized weight. Where the previous op's outputs can be permuted instead,
the gather disappears entirely: down_proj's input is silu(gate) * up, elementwise over the
intermediate channels, so permuting gate_proj's and up_proj's output rows (codes, scales,
zeros and biases together) delivers x[perm] for free (``fold_into_previous``). q/k/v and
gate/up read the normalised residual stream, which every layer shares, and o_proj reads the
attention output, whose channels are tied to heads: those keep the gather (InputPermuted).

In memory, an act-ordered linear is a QuantizedWeight whose column j is input channel perm[j],
plus perm; the writers below turn that back into the stored form.
"""
from __future__ import annotations

import torch

from lowbit.errors import QuantizationError
from lowbit.layers.qweight import QuantizedWeight

G_IDX = "weight_g_idx"  # compressed-tensors' tensor name (AutoGPTQ/GPTQModel call it "g_idx")
DOWN, FOLD_TARGETS = "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")


def g_idx_of(perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 g_idx [in] of a weight whose column j is channel perm[j]: g_idx[perm[j]] = j // G."""
    g_idx = torch.empty(perm.numel(), dtype=torch.int32)
    g_idx[perm] = (torch.arange(perm.numel()) // group_size).to(torch.int32)
    return g_idx


def stored_columns(qw: QuantizedWeight, perm: torch.Tensor | None) -> QuantizedWeight:
    """The codes back in the original column order, scales and zeros still indexed by group: the
    form the checkpoint packs (its .dequantize() is only meaningful together with g_idx)."""
    if perm is None:
        return qw
    q = torch.empty_like(qw.q)
    q[:, perm] = qw.q
    return QuantizedWeight(q=q, scales=qw.scales, zeros=qw.zeros, bits=qw.bits, group_size=qw.group_size, sym=qw.sym)


def regroup(qw: QuantizedWeight, g_idx: torch.Tensor, name: str = "layer") -> tuple[QuantizedWeight, torch.Tensor | None]:
    """A weight as stored (codes in the original order, group of column c = g_idx[c]) ->
    (group-contiguous QuantizedWeight, perm), perm None when g_idx is already the trivial map.

    Every group must hold exactly group_size columns (true of every act-order GPTQ checkpoint);
    anything else cannot be made group-contiguous and is refused."""
    g = qw.group_size
    n_groups = qw.in_features // g
    g_idx = g_idx.reshape(-1).to(torch.int64)
    if g_idx.numel() != qw.in_features:
        raise QuantizationError(f"{name}: g_idx has {g_idx.numel()} entries for {qw.in_features} input channels")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise QuantizationError(f"{name}: g_idx holds group numbers outside 0..{n_groups - 1}")
    trivial = torch.arange(qw.in_features) // g
    if torch.equal(g_idx, trivial):
        return qw, None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], trivial):
        sizes = torch.bincount(g_idx, minlength=n_groups)
        raise QuantizationError(
            f"{name}: g_idx groups are not all {g} columns wide (sizes {sorted(set(sizes.tolist()))[:5]}); "
            "such a weight has no group-contiguous layout"
        )
    q = qw.q[:, perm].contiguous()
    return QuantizedWeight(q=q, scales=qw.scales, zeros=qw.zeros, bits=qw.bits, group_size=g, sym=qw.sym), perm


def _permute_rows(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(q=qw.q[perm].contiguous(), scales=qw.scales[perm].contiguous(),
                           zeros=qw.zeros[perm].contiguous(), bits=qw.bits, group_size=qw.group_size, sym=qw.sym)


def fold_into_previous(
    quantized: dict[str, QuantizedWeight], fp_tensors: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fold every down_proj input permutation into its gate_proj/up_proj output rows (in place
    on the dicts); returns the permutations that must still be applied to the activations."""
    left = dict(perms)
    for name, perm in perms.items():
        if not name.endswith(DOWN):
            continue
        base = name[: -len(DOWN)]
        targets = [base + t for t in FOLD_TARGETS]
        if not all(t in quantized or f"{t}.weight" in fp_tensors for t in targets):
            continue  # not a gated MLP we know: keep the gather
        for t in targets:
            if t in quantized:
                quantized[t] = _permute_rows(quantized[t], perm)
            else:
                fp_tensors[f"{t}.weight"] = fp_tensors[f"{t}.weight"][perm].contiguous()
            if f"{t}.bias" in fp_tensors:
                fp_tensors[f"{t}.bias"] = fp_tensors[f"{t}.bias"][perm].contiguous()
        del left[name]
    return left
