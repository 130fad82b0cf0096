"""AWQ's clip search: per (output row, group) threshold max|w| * (1 - i/20), i < 10, minimising the
error of each group's partial dot product on sampled tokens (llm-awq's auto_clip).

Skipped for q and k: their error is amplified by the softmax, and clipping them hurts.
"""
from __future__ import annotations

import math

import torch

from ..models.transformer import DecoderLayer
from .awq_config import AwqConfig, ClipResult, LayerCapture, input_key
from .capture import sample_tokens
from .rtn import QuantSpec, linear_names

CLIP_SKIP = ("q_proj", "k_proj")
CLIP_BATCH_ELEMENTS = 1 << 22  # bound on the [groups, tokens, rows] products of one clip step (16 MB)


def stratified_sample(x: torch.Tensor, weights: torch.Tensor | None, n: int, n_heavy: int,
                      seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of x [N, d]: the n_heavy of largest norm, kept at their weight, and the rest drawn at
    random, each standing for its share of the rows not drawn. Returns (rows, weights, mean 1)."""
    w = torch.ones(x.shape[0]) if weights is None else weights.float()
    if x.shape[0] <= n:
        return x, w / w.mean()
    heavy = x.float().pow(2).sum(1).topk(min(n_heavy, n)).indices
    rest = torch.ones(x.shape[0], dtype=torch.bool)
    rest[heavy] = False
    pool = rest.nonzero().squeeze(1)
    drawn = pool[sample_tokens(pool.numel(), n - heavy.numel(), seed)]
    w_drawn = w[drawn] * (float(w[pool].sum()) / max(float(w[drawn].sum()), 1e-30))
    out_w = torch.cat([w[heavy], w_drawn])
    return x[torch.cat([heavy, drawn])], out_w / out_w.mean()


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, cfg: AwqConfig,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """Best per-(row, group) clip threshold for weight w [out, in] on tokens x [n, in] (optionally
    weighted per token).

    Returns (max_val [out, n_groups], error before, error after), errors being the mean squared
    error of the per-group partial outputs, as llm-awq's auto_clip measures it.
    """
    out_f, in_f = w.shape
    g = spec.validate(in_f)
    n_groups = in_f // g
    wg = w.float().reshape(out_f, n_groups, g)
    xg = x.float().reshape(-1, n_groups, g).transpose(0, 1).contiguous()  # [G, n, g]
    n_tok = xg.shape[1]
    tw = (torch.ones(n_tok) if weights is None else weights.float() / weights.float().mean()).view(1, -1, 1)
    org_max = wg.abs().amax(dim=-1)  # [out, G]
    best_max = org_max.clone()
    rows = max(1, min(out_f, CLIP_BATCH_ELEMENTS // max(1, n_groups * n_tok)))
    err_first, err_best = 0.0, 0.0
    for r0 in range(0, out_f, rows):
        w_b = wg[r0 : r0 + rows]  # [b, G, g]
        ref = torch.bmm(xg, w_b.permute(1, 2, 0))  # [G, n, b]
        min_err = torch.full((w_b.shape[0], n_groups), math.inf)
        first = None
        for i in range(int(cfg.max_shrink * cfg.clip_grid)):
            max_val = org_max[r0 : r0 + rows] * (1 - i / cfg.clip_grid)
            q = spec.fake(w_b.reshape(w_b.shape[0], -1), max_val=max_val).reshape_as(w_b)
            out = torch.bmm(xg, q.permute(1, 2, 0))
            err = ((out - ref).pow(2) * tw).mean(dim=1).t()  # [b, G]
            err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
            if first is None:
                first = err.clone()
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max[r0 : r0 + rows] = torch.where(better, max_val, best_max[r0 : r0 + rows])
        finite = torch.isfinite(min_err)
        err_best += float(min_err[finite].sum())
        err_first += float(first[torch.isfinite(first)].sum())
    n = out_f * n_groups
    return best_max, err_first / n, err_best / n


@torch.no_grad()
def clip_layer(layer: DecoderLayer, cap: LayerCapture, spec: QuantSpec, cfg: AwqConfig) -> tuple[dict[str, torch.Tensor], list[ClipResult]]:
    """Clip thresholds for every linear but q/k, on cfg.clip_tokens tokens: the quarter of largest
    norm and the rest drawn at random, weighted (stratified_sample)."""
    thresholds: dict[str, torch.Tensor] = {}
    results: list[ClipResult] = []
    for name in linear_names(layer):
        if name.endswith(CLIP_SKIP):
            continue
        lin = layer.get_submodule(name)
        key = input_key(name)
        x = cap.inputs[key]
        x, w = stratified_sample(x.reshape(-1, x.shape[-1]), cap.weights.get(key), cfg.clip_tokens, cfg.clip_tokens // 4)
        max_val, before, after = search_clip(lin.weight.data, x, spec, cfg, w)
        org = lin.weight.data.float().reshape(max_val.shape[0], max_val.shape[1], -1).abs().amax(-1)
        ratio = (max_val / org.clamp(min=1e-12)).clamp(max=1.0)
        thresholds[name] = max_val
        results.append(ClipResult(name, float(ratio.mean()), float((ratio < 1).float().mean()), before, after))
    return thresholds, results


def clamp_groups(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each (row, group) of w [out, in] to +-max_val [out, n_groups]."""
    out_f, n_groups = max_val.shape
    mv = max_val.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.reshape(out_f, n_groups, -1), -mv, mv).reshape(w.shape)
