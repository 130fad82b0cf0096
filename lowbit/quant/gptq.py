"""GPTQ: rounding one weight matrix against its layer's Hessian (Frantar et al., ICLR 2023).

Why it beats round-to-nearest: the output error of a linear over its calibration inputs X is
tr(D H D^T) / 2 with D = W_q - W and H = 2 X X^T / n. Rounding column j leaves an error that
the columns not yet rounded can absorb: the optimal update spreads it along row j of H^-1.
GPTQ rounds the columns left to right, each onto its group's grid, and after each column
updates the columns to its right with that correction; the Cholesky factor U of H^-1 (upper)
gives every correction in closed form, so the whole pass costs O(out * in^2).

What this module does, on one weight W [out, in] and its H [in, in]:
  * dampening: H += damp * mean(diag H) * I (``GptqConfig.damp``, 0.01 as in the paper); if the
    Cholesky still fails the dampening grows tenfold, up to ``max_damp_tries`` times;
  * dead inputs (diag H == 0, a channel that is zero on every calibration token): H_jj := 1 and
    W[:, j] := 0, exactly as GPTQ does; the channel never carries signal so the output is unchanged;
  * blocked updates (``block_size`` 128): inside a block the corrections are applied column by
    column, the rest of the matrix gets them as one matmul per block ("lazy batch" updates);
  * groups: the grid (scale, zero) of a group is chosen when its first column is reached, from
    the columns as they are then (already corrected by everything to their left), by
    primitives.quantize_weight itself: the same min/max grid, symmetric or not, the same scale
    rounding to the checkpoint's scale dtype and the same rounding as RTN and AWQ. The block
    size is rounded to a multiple of the group size (or the other way round) so a group's
    columns are always up to date when its grid is chosen;
  * optional clip thresholds (AWQ's, for AWQ+GPTQ): W is clamped to them first, as AWQ does
    before rounding, and each group's grid is chosen on the clamped range;
  * activation order (``act_order``):
      "group":  columns are processed in descending diag(H) order and the groups are formed in
                that order (AutoGPTQ's desc_act, compressed-tensors' actorder "group"). The result
                is returned group-contiguous in the processing order together with the
                permutation: column j of ``qweight`` is input channel ``perm[j]``. That is the
                layout lowbit computes with (the activations are gathered by ``perm`` once per
                linear, never a per-element group index); the checkpoint writers turn it into
                the stored form (original column order plus g_idx);
      "weight": columns are processed in the same order but every group keeps its original
                columns, its grid chosen up front from the original weights (llm-compressor's
                actorder "weight"): no permutation is left, the result is stored like plain GPTQ
                and loads everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import QuantizationError
from .primitives import quantize_weight, quantize_weight_searched, round_to_grid
from ..layers.qweight import QuantizedWeight
from .rtn import QuantSpec

ACT_ORDERS = ("group", "weight")
GRIDS = ("minmax", "mse")


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ's own settings (the integer grid is the QuantSpec)."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128
    # None, "group" or "weight" (see the module docstring). "weight" by default: on the default model
    # (W4 g64, WikiText-2 16 windows) it closed 65.4% of RTN's perplexity gap against 52.3% without,
    # keeps the original groups (any format, no permutation at run time) and costs no extra time.
    act_order: str | None = "weight"
    max_damp_tries: int = 5  # each failed Cholesky multiplies the dampening by 10
    # How a group's grid is chosen: "minmax" (RTN's), or "mse": the range shrink that minimizes the
    # group's rounding error weighted by diag(H) (primitives.quantize_weight_searched).
    grid: str = "mse"

    def validate(self) -> None:
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1e3 and math.isfinite(self.damp)):
            raise QuantizationError(f"GPTQ dampening must be a positive number, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise QuantizationError(f"GPTQ block size must be a positive integer, got {self.block_size!r}")
        if self.act_order not in (None, *ACT_ORDERS):
            raise QuantizationError(f"act order must be one of {', '.join(ACT_ORDERS)} or None, got {self.act_order!r}")
        if self.grid not in GRIDS:
            raise QuantizationError(f"GPTQ grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")


@dataclass
class GptqResult:
    """qweight is group-contiguous; with act order "group" its column j is input channel perm[j]."""

    qweight: QuantizedWeight
    perm: torch.Tensor | None  # int64 [in], None = identity
    damp: float  # the dampening actually added (absolute)
    err: float  # output MSE per output channel and token, tr(D H D^T) / (2 out), undamped H
    err_rtn: float  # the same for plain RTN of the input weight (what GPTQ is measured against)
    damp_raised: bool = False  # the Cholesky needed more than cfg.damp

    def dequantize(self) -> torch.Tensor:
        """fp32 W_q [out, in] in the original input-channel order."""
        return unpermute_columns(self.qweight.dequantize(torch.float32), self.perm)


def act_order(h: torch.Tensor) -> torch.Tensor:
    """The act-order column order: descending diag(H), ties in channel order."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def unpermute_columns(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Columns stored in perm order -> original order (out[:, perm[j]] = w[:, j])."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


@torch.no_grad()
def gptq_quantize_heads(
    w: torch.Tensor,
    hs: list[torch.Tensor],
    spec: QuantSpec,
    cfg: GptqConfig = GptqConfig(),
    max_val: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> GptqResult:
    """GPTQ of a weight whose rows fall into len(hs) equal blocks (heads), block i rounded against
    hs[i] (v_proj: one attention-weighted Hessian per kv head, see gptq_hessian). Act order, which
    must be one permutation for the whole weight, follows `order` when given (v_proj: q/k's, so
    that q/k/v keep one permutation and stay fusable), else the diagonal summed over the blocks."""
    if not hs or w.dim() != 2 or w.shape[0] % len(hs):
        raise QuantizationError(f"GPTQ by heads: {len(hs)} Hessians do not split W of shape {tuple(w.shape)}")
    rows = w.shape[0] // len(hs)
    if cfg.act_order is not None and order is None:
        order = act_order(sum(h.float() for h in hs))
    parts = [gptq_quantize_shared([w[i * rows : (i + 1) * rows]], h, spec, cfg,
                                  [None if max_val is None else max_val[i * rows : (i + 1) * rows]], order)[0]
             for i, h in enumerate(hs)]
    first = parts[0].qweight
    qw = QuantizedWeight(
        q=torch.cat([p.qweight.q for p in parts]), scales=torch.cat([p.qweight.scales for p in parts]),
        zeros=torch.cat([p.qweight.zeros for p in parts]), bits=first.bits, group_size=first.group_size, sym=first.sym,
    )
    mean = lambda key: sum(getattr(p, key) for p in parts) / len(parts)  # noqa: E731 - equal row counts
    return GptqResult(qw, parts[0].perm, max(p.damp for p in parts), mean("err"), mean("err_rtn"),
                      damp_raised=any(p.damp_raised for p in parts))


# ----------------------------------------------------------------------------- Hessian


class HessianAccumulator:
    """H = 2 X X^T / n over every input row seen, summed chunk by chunk in float32.

    float32 like GPTQ's reference code: a float64 sum would cost 640 MB for one 8960-wide
    down_proj of a 1.5B model, and the rounding of the sum is far below the 1% dampening.

    Wide inputs are summed by SYMMETRIC_BLOCKS row blocks, each only from its diagonal block to
    the right (the lower triangle is mirrored once, in hessian()): 10/16 of the products. On
    the 2-core dev machine a 2048 x 1536 chunk took 93 ms against 160 ms for the full product;
    at 576 features the gain is lost in the smaller calls."""

    SYMMETRIC_MIN = 1024
    SYMMETRIC_BLOCKS = 4

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.total = torch.zeros(n_features, n_features)
        self.count = 0
        nb = self.SYMMETRIC_BLOCKS if n_features >= self.SYMMETRIC_MIN else 1
        self._edges = [round(i * n_features / nb) for i in range(nb + 1)]

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if flat.shape[1] != self.n_features:
            raise QuantizationError(f"Hessian of {self.n_features} features fed rows of {flat.shape[1]}")
        e = self._edges
        for a, b in zip(e[:-1], e[1:]):  # row block [a, b), columns a.. (upper trapezoid)
            self.total[a:b, a:].addmm_(flat[:, a:b].t(), flat[:, a:])
        self.count += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise QuantizationError("no calibration inputs reached this linear; its Hessian is empty")
        h = self.total * (2.0 / self.count)
        if len(self._edges) > 2:
            h = torch.triu(h) + torch.triu(h, 1).t()
        return h


def output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """tr(D H D^T) / (2 out): the mean squared output error per channel and token."""
    d = d.float()
    v = float(((d @ h.float()) * d).sum(dtype=torch.float64)) / (2 * d.shape[0])
    return max(0.0, v) if math.isfinite(v) else math.inf


# ----------------------------------------------------------------------------- algorithm


def block_size_for(group: int, in_features: int, block: int) -> int:
    """A block that never splits a group: a multiple of the group when groups are small, else a
    divisor of the group (a whole group when it does not split evenly)."""
    if group <= block:
        return group * max(1, block // group)
    return block if group % block == 0 else min(group, in_features)


def _grids(cfg: GptqConfig, w: torch.Tensor, spec: QuantSpec, group: int, importance: torch.Tensor,
           max_val: torch.Tensor | None) -> QuantizedWeight:
    """The grids (and RTN codes) of w's groups as cfg.grid chooses them."""
    if cfg.grid == "mse":
        return quantize_weight_searched(w, spec.bits, group, spec.sym, importance, max_val, spec.scale_dtype)
    return quantize_weight(w, spec.bits, group, spec.sym, max_val=max_val, scale_dtype=spec.scale_dtype)


def _inverse_cholesky(h: torch.Tensor, damp: float, tries: int) -> tuple[torch.Tensor, float]:
    """U with U^T U = (H + damp I)^-1, U upper triangular, in float32 as GPTQ's reference code
    computes it; grows damp tenfold while H + damp I is not positive definite. Returns (U, damp).

    Why through the reversed matrix: with J the order reversal and J (H + damp I) J = M M^T (M
    lower), (H + damp I)^-1 = (J M^-1 J)^T (J M^-1 J) and J M^-1 J is upper triangular, so U is
    one Cholesky and one triangular inverse. The textbook route (Cholesky, inverse, product,
    second Cholesky) costs three times as much: 3.0 s against 1.0 s for a 1536-wide down_proj
    on the 2-core dev machine, the largest single cost of GPTQ on the default model."""
    n = h.shape[0]
    eye = torch.eye(n)
    flipped = torch.flip(h, dims=(0, 1))
    for _ in range(max(1, tries)):
        m, info = torch.linalg.cholesky_ex(flipped + damp * eye)
        if int(info) == 0:
            m_inv = torch.linalg.solve_triangular(m, eye, upper=False)
            u = torch.flip(m_inv, dims=(0, 1))
            if bool(torch.isfinite(u).all()):
                return u, damp
        damp *= 10.0
    raise QuantizationError(
        f"GPTQ: the Hessian is not positive definite even with dampening {damp / 10:.3g}; "
        "the calibration activations are degenerate (NaN/inf, or far too few tokens)"
    )


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    cfg: GptqConfig = GptqConfig(),
    max_val: torch.Tensor | None = None,
) -> GptqResult:
    """GPTQ of one weight w [out, in] with Hessian h [in, in] onto spec's grid.

    max_val: AWQ clip thresholds [out, n_groups] in the original column order (optional).
    """
    return gptq_quantize_shared([w], h, spec, cfg, [max_val])[0]


@torch.no_grad()
def gptq_quantize_shared(
    ws: list[torch.Tensor],
    h: torch.Tensor,
    spec: QuantSpec,
    cfg: GptqConfig = GptqConfig(),
    max_vals: list[torch.Tensor | None] | None = None,
    order: torch.Tensor | None = None,
) -> list[GptqResult]:
    """GPTQ of weights that read the same input (q/k, gate/up: one Hessian) in one pass.

    Why stacked: every GPTQ correction moves along a row of W (output channel) and depends only
    on H, so the rows of several weights can be rounded together: one Cholesky factor and one
    column loop instead of one per weight (q/k/v: 3 -> 1), with each weight's result the same
    as alone. max_vals: per weight, AWQ clip thresholds or None (no clipping: +inf).
    order: the act-order column order to use instead of descending diag(h) (gptq_quantize_heads).
    """
    if not ws:
        return []
    if any(w.dim() != 2 for w in ws) or len({w.shape[1] for w in ws}) != 1:
        raise QuantizationError(f"GPTQ of shared-input weights needs 2-D weights of one width; got {[tuple(w.shape) for w in ws]}")
    max_vals = list(max_vals) if max_vals is not None else [None] * len(ws)
    if len(max_vals) != len(ws):
        raise QuantizationError("GPTQ: one clip threshold entry (or None) per weight")
    sizes = [w.shape[0] for w in ws]
    w = ws[0] if len(ws) == 1 else torch.cat([x.detach().float() for x in ws])
    max_val = max_vals[0]
    if len(ws) > 1 and any(m is not None for m in max_vals):
        n_groups = w.shape[1] // spec.validate(w.shape[1])
        max_val = torch.cat([m.float() if m is not None else torch.full((n, n_groups), math.inf)
                             for m, n in zip(max_vals, sizes)])
    cfg.validate()
    if w.dim() != 2 or tuple(h.shape) != (w.shape[1], w.shape[1]):
        raise QuantizationError(f"GPTQ needs W [out, in] and H [in, in]; got {tuple(w.shape)} and {tuple(h.shape)}")
    out_f, in_f = w.shape
    g = spec.validate(in_f)
    n_groups = in_f // g
    w0 = w.detach().float()
    h = h.detach().float().clone()
    if not bool(torch.isfinite(h).all()):
        raise QuantizationError("GPTQ: the Hessian holds NaN or inf (non-finite calibration activations)")
    W = w0.clone()
    if max_val is not None:
        W = torch.clamp(W.reshape(out_f, n_groups, g), -max_val.unsqueeze(-1), max_val.unsqueeze(-1)).reshape(out_f, in_f)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = None
    if cfg.act_order is not None:
        perm = order if order is not None else act_order(h)
    static = None
    if cfg.act_order == "weight":  # grids of the original groups, fixed before any column moves
        static = _grids(cfg, W, spec, g, torch.diagonal(h), max_val)
    if perm is not None:
        W, hp = W[:, perm].contiguous(), h[perm][:, perm]
    else:
        hp = h
    damp0 = cfg.damp * float(torch.diagonal(hp).mean())
    u, damp = _inverse_cholesky(hp, damp0, cfg.max_damp_tries)

    # Transposed: input channel j is row j of wt, so the per-column corrections below update
    # contiguous rows (10x faster on CPU than strided column slices).
    wt = W.t().contiguous()
    codes = torch.empty(in_f, out_f)
    scales = torch.empty(out_f, n_groups)
    zeros = torch.empty(out_f, n_groups)
    grid_clip = max_val if cfg.act_order is None else None  # original groups only
    bs = block_size_for(g, in_f, cfg.block_size)
    scale = zero = None
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                grp = int(perm[col]) // g
                scale, zero = static.scales[:, grp], static.zeros[:, grp].float()
            elif col % g == 0:
                grp = col // g
                src = w1[i : i + g] if i + g <= i2 - i1 else wt[col : col + g]
                mv = None if grid_clip is None else grid_clip[:, grp]
                found = _grids(cfg, src.t(), spec, -1, torch.diagonal(hp)[col : col + g], mv)
                scale, zero = found.scales[:, 0], found.zeros[:, 0].float()
                scales[:, grp], zeros[:, grp] = scale, zero
            x = w1[i]
            q = round_to_grid(x, scale, zero, spec.bits)
            codes[col] = q
            e = (x - (q - zero) * scale).div_(u1[i, i])
            w1[i:].addr_(u1[i, i:], e, alpha=-1.0)  # rank-1 correction of the columns to the right
            err1[i] = e
        if i2 < in_f:
            wt[i2:].sub_(u[i1:i2, i2:].t() @ err1)
    codes = codes.t()

    if static is not None:  # back to the original column order, the original groups' grids
        codes = unpermute_columns(codes, perm)
        scales, zeros, perm = static.scales.clone(), static.zeros.float(), None
    elif perm is not None and n_groups == 1:  # one group: the order within it is free to undo
        codes, perm = unpermute_columns(codes, perm), None
    results, row = [], 0
    for n in sizes:
        rows = slice(row, row + n)
        row += n
        qw = QuantizedWeight(
            q=codes[rows].to(torch.uint8).contiguous(), scales=scales[rows].contiguous(),
            zeros=zeros[rows].to(torch.uint8).contiguous(), bits=spec.bits, group_size=g, sym=spec.sym,
        )
        source = w0[rows]
        err_rtn = output_error(spec.quantize(source).dequantize() - source, h)
        result = GptqResult(qw, perm, damp, 0.0, err_rtn, damp_raised=damp > damp0 * 1.5)
        result.err = output_error(result.dequantize() - source, h)
        results.append(result)
    return results
