"""AWQ: activation-aware weight quantization of one decoder layer (Lin et al., MLSys 2024).

Why it works: the weight channels that meet large activations matter most. Multiplying such an
input channel of W by s > 1 (and dividing the activation by s, folded into the op before it) makes
its relative rounding error ~s times smaller, at the cost of the other channels. AWQ picks s per
input channel as mean|x|^ratio, searching the ratio on a grid of 20 against the real output error
of the block that consumes the weights, then searches a per-group clipping threshold.

Details follow llm-awq (auto_scale.py, auto_clip.py) and AutoAWQ's quantizer:
  * scale groups of a Llama-family layer (loss measured on the output of `inspect`):
      input_layernorm          -> q, k, v   (inspect: self_attn, the whole attention)
      v_proj                   -> o_proj    (only when the two weights have the same shape, i.e. no GQA)
      post_attention_layernorm -> gate, up  (inspect: mlp)
      up_proj                  -> down_proj
  * s = mean|x|^r (optionally / mean_w^(1-r), AutoAWQ's "duo" scaling), r in {0, 1/20, ..., 19/20},
    normalised by sqrt(max(s) * min(s)); every group is searched against the original fp weights,
    then all scales are folded in, so the fp function is unchanged before rounding.
  * clipping: per (output row, group) threshold max|w| * (1 - i/20), i < 10, minimising the error
    of each group's partial dot product on sampled tokens; skipped for q and k (their error is
    amplified by the softmax and clipping them hurts).
  * a group whose search finds no finite loss falls back to no scaling (warning, no NaN).

lowbit's own choices, for speed on a CPU: the per-channel statistics use every calibration
token, the attention search uses the first `search_samples` sequences only, the per-token
searches (MLP, down_proj, clip) a sample of tokens, and activations carried between layers are
stored in float16 when they fit (see ActivationStore). The token samples are stratified: the
tokens of largest norm (the attention sinks, whose massive activations a middle layer writes)
are always in them, the rest drawn at random and weighted up (HeavyTokens): at their true weight
in the clip search, and left out of the scale searches (search_heavy_weight).
llm-awq gets the sinks into its clip sample by its stride (at ~128x their frequency); a random sample holds
about one and lets the clip search cut the weights that make them.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from ..layers.qweight import QuantizedWeight
from .rtn import QuantSpec, linear_names, load_dequantized_, rtn_quantize_layer

FP16_SAFE = 6.0e4  # store a chunk in float16 only if all its values are below this in magnitude
CLIP_SKIP = ("q_proj", "k_proj")
HEAVY_MAX_SHARE = 64  # at most 1/64 of the calibration tokens count as heavy (per criterion)
CLIP_BATCH_ELEMENTS = 1 << 22  # bound on the [groups, tokens, rows] products of one clip step (16 MB)


@dataclass
class AwqConfig:
    """Search settings (the quantization grid itself is the QuantSpec)."""

    n_grid: int = 20
    duo_scaling: bool | str = True  # True: AutoAWQ's duo term; False: activations only (llm-awq); "both": search both grids (llm-compressor)
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    search_samples: int | None = 8  # whole sequences for the attention search and the error report (None: all)
    search_tokens: int | None = 4096  # tokens sampled from all calibration data for the per-token searches (None: all)
    heavy_tokens: int = 128  # per criterion (largest input / output norm): always in the per-token samples, at their true weight
    # The heavy tokens' weight in the scale searches, relative to their true weight. 0 by default:
    # their squared error is huge in absolute terms but the RMSNorm after the residual divides it
    # by their huge norm, so at weight 1 they steer the picks away from what the other tokens need
    # (W4 g64, 128 x 512, ppl16: 24.38 / 24.61 at 1.0 vs 24.28 / 24.31 at 0.0, AWQ / CT format).
    # They stay protected by the clip search, which scores them at their true weight.
    search_heavy_weight: float = 0.0
    # Weight each token by 1 / mean(h^2) of its layer input, in the per-token searches (scale and
    # clip) and in the per-channel mean |x| the scale grid is built on: error relative to the
    # residual stream, which is what the next RMSNorm passes on. Measured (W4 g64, 128 x 512,
    # ppl16; AWQ / compressed-tensors format): absolute 24.28 / 24.31; relative losses 24.16 /
    # 24.03; relative losses and mean 24.04 / 24.01. (On a second machine, losses only: 24.49 ->
    # 23.97, seed 1 24.43 -> 24.06.) Weighting the attention search's positions changed nothing.
    relative_loss: bool = True
    chunk_tokens: int = 2048  # tokens per forward call (bounds activation and attention memory)
    carry: str = "quantized"  # next layer's inputs: "quantized" layer outputs, or "fp" (llm-awq / AutoAWQ)
    # Score lone linears (down_proj; o_proj where v -> o is searched) on EVERY calibration token
    # through a Gram matrix accumulated during capture, instead of on the search_tokens sample.
    # Costs about n x in^2 per layer once; a grid point costs the same either way. Off by default:
    # on the default model (W4 g64, 128 x 512) it moved ppl 25.79 -> 23.83 in compressed-tensors
    # format but 23.84 -> 26.34 in AWQ format; the instability lies elsewhere (see the issue notes).
    gram_all_tokens: bool = False


# ----------------------------------------------------------------------------- activations


class ActivationStore:
    """The calibration hidden states [n_seq, T, H] carried from layer to layer, kept in chunks.

    Chunks are stored in float16 when every value fits (half the memory, and the stored error is
    far below 3/4-bit weight noise) and in float32 otherwise; they are always served as float32.
    """

    def __init__(self, compact: bool = True) -> None:
        self.compact = compact
        self._chunks: list[torch.Tensor] = []

    def append(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.compact and bool(torch.isfinite(x).all()) and float(x.abs().max()) < FP16_SAFE:
            x = x.to(torch.float16)
        self._chunks.append(x)

    def __iter__(self):
        for c in self._chunks:
            yield c.float()

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def n_sequences(self) -> int:
        return sum(c.shape[0] for c in self._chunks)

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks)


def chunk_sequences(seqlen: int, chunk_tokens: int) -> int:
    return max(1, chunk_tokens // max(1, seqlen))


def positions_for(x: torch.Tensor) -> torch.Tensor:
    b, t = x.shape[0], x.shape[1]
    return torch.arange(t).expand(b, t)


# ----------------------------------------------------------------------------- results


@dataclass
class ScaleGroup:
    name: str
    prev: str  # the op the inverse scale is folded into (a norm or a linear)
    linears: tuple[str, ...]
    inspect: str  # module whose output is the loss; its input is the linears' input

    @property
    def lone(self) -> bool:
        """One linear scored on its own output (v -> o, up -> down): a Gram matrix can score it."""
        return self.linears == (self.inspect,)


@dataclass
class GroupResult:
    name: str
    prev: str
    linears: list[str]
    ratio: float | None  # the chosen grid ratio; None when the search fell back to no scaling
    loss_rtn: float  # plain RTN of the group (no scaling)
    loss_awq: float  # with the chosen scales
    losses: list[float] = field(default_factory=list)  # per grid point (duo grid first under "both")
    fallback: bool = False
    duo: bool | None = None  # whether the chosen scales used the weight term


@dataclass
class ClipResult:
    name: str
    mean_ratio: float  # mean of the chosen max_val / original max|w| over all groups
    clipped_fraction: float  # fraction of groups whose threshold was lowered
    err_before: float
    err_after: float


@dataclass
class LayerResult:
    index: int
    groups: list[GroupResult]
    clips: list[ClipResult]
    err_rtn: float  # layer-output MSE vs fp with plain RTN, on the search inputs
    err_awq: float  # the same with AWQ
    seconds: float


@dataclass
class LayerCapture:
    """What one fp pass over the calibration data leaves behind for the searches."""

    h: torch.Tensor  # layer input of the search sequences [S, T, H]
    y: torch.Tensor  # fp layer output of the search sequences
    inputs: dict[str, torch.Tensor]  # module name -> its input on the search sequences
    targets: dict[str, torch.Tensor]  # module name -> its fp output on the search sequences
    abs_mean: dict[str, torch.Tensor]  # module name -> mean |input| per channel over ALL tokens
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token module -> weight of each kept token (mean 1)
    heavy: dict[str, int] = field(default_factory=dict)  # per-token module -> number of heavy tokens (the first rows)
    grams: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # name -> (X^T X over ALL tokens, n)


# ----------------------------------------------------------------------------- groups


def scale_groups(layer: DecoderLayer) -> list[ScaleGroup]:
    attn = layer.self_attn
    groups = [ScaleGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("v_o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScaleGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(ScaleGroup("up_down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


def input_key(linear: str) -> str:
    """The captured input a linear reads: q/k/v read the attention input, gate/up the MLP input."""
    if linear.endswith(("q_proj", "k_proj", "v_proj")):
        return "self_attn"
    if linear.endswith(("gate_proj", "up_proj")):
        return "mlp"
    return linear


CAPTURED = ("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj")
SEQUENCE_CAPTURED = ("self_attn",)  # attention mixes tokens: captured as whole sequences


def run_module(layer: DecoderLayer, name: str, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    if name == "self_attn":
        return layer.self_attn(x, positions_for(x), rotary, None)
    return layer.get_submodule(name)(x)


def run_layer(layer: DecoderLayer, h: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    return layer(h, positions_for(h), rotary)


# ----------------------------------------------------------------------------- capture


def sample_tokens(total: int, n_tokens: int | None, seed: int = 0) -> torch.Tensor:
    """Boolean mask over all calibration tokens choosing n_tokens of them (all if None).

    Seeded random, not a stride: a stride that divides the block length picks every block's
    first token, the attention sink with its huge activations, and with the defaults weighted it
    8x above its real frequency in every search (measured: W4 perplexity 24.8 -> 24.5). The sink
    tokens are not left to chance either: HeavyTokens keeps them at their true weight.
    """
    if not n_tokens or n_tokens >= total:
        return torch.ones(total, dtype=torch.bool)
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_tokens]] = True
    return chosen


class HeavyTokens:
    """The k tokens with the largest score seen so far (streamed chunk by chunk), with their rows.

    Why: a few tokens (the attention sink at each block's start, where a middle layer writes a
    massive activation) carry most of a layer's output error. In a random sample of 4,096 of 65,536
    tokens their count is a coin toss, and a search that misses them clips or scales away the
    weights that make them (measured on SmolLM2 layer 11: sink-token error 66 -> 115,742).
    Kept exactly and weighted at their true frequency, the sampled loss stays unbiased.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.score = torch.empty(0)
        self.index = torch.empty(0, dtype=torch.long)
        self.rows: list[torch.Tensor] = []

    def offer(self, score: torch.Tensor, index: torch.Tensor, *rows: torch.Tensor) -> None:
        if self.k <= 0 or not score.numel():
            return
        top = score.topk(min(self.k, score.numel())).indices
        cand_score = torch.cat([self.score, score[top]])
        cand_index = torch.cat([self.index, index[top]])
        cand_rows = [r[top] if not self.rows else torch.cat([old, r[top]]) for old, r in zip(self.rows or rows, rows)]
        keep = cand_score.topk(min(self.k, cand_score.numel())).indices
        self.score, self.index, self.rows = cand_score[keep], cand_index[keep], [r[keep] for r in cand_rows]


def merge_heavy(total: int, sample: tuple[torch.Tensor, ...], heavy: list[HeavyTokens]
                ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Union of the heavy tokens (weight 1 each) and the random sample (index, *rows) without them
    (each standing for its share of the remaining tokens). Returns (rows, weights normalised to
    mean 1, number of heavy tokens, which come first)."""
    idx, *rows = sample
    kept = [h for h in heavy if h.rows]
    h_idx = torch.cat([h.index for h in kept]) if kept else torch.empty(0, dtype=torch.long)
    h_idx, first = _unique_first(h_idx)
    h_rows = [torch.cat([h.rows[i] for h in kept])[first] if kept else r[:0] for i, r in enumerate(rows)]
    rest = ~torch.isin(idx, h_idx)
    n_rest = int(rest.sum())
    w_rest = (total - h_idx.numel()) / n_rest if n_rest else 0.0
    w = torch.cat([torch.ones(h_idx.numel()), torch.full((n_rest,), float(w_rest))])
    return [torch.cat([hr, r[rest]]) for hr, r in zip(h_rows, rows)], w / w.mean(), h_idx.numel()


def _unique_first(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of index and the position of each one's first occurrence."""
    if not index.numel():
        return index, index
    uniq, inverse = torch.unique(index, return_inverse=True)
    first = torch.full((uniq.numel(),), index.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(index.numel()), reduce="amin")
    return uniq, first


@torch.no_grad()
def capture(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, n_search: int, n_tokens: int | None,
    keep_outputs: ActivationStore | None = None, gram_modules: tuple[str, ...] = (), n_heavy: int = 0,
    relative: bool = False,
) -> LayerCapture:
    """One fp pass over all calibration chunks. Keeps: the per-channel mean |x| of every scaled
    input over all tokens; the attention's inputs/outputs (and the layer's) for the first n_search
    sequences, since attention needs whole sequences; and for the per-token modules (o_proj, MLP,
    down_proj) n_tokens tokens drawn at random (seeded) from all calibration tokens plus the
    n_heavy tokens of largest input and of largest output norm, with weights (see merge_heavy);
    relative: those weights, and each token's share of the mean |x|, divided by its mean square of
    the layer input."""
    total = sum(h.shape[0] * h.shape[1] for h in store._chunks)
    chosen = sample_tokens(total, n_tokens)
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    keep: dict[str, list[torch.Tensor]] = {k: [] for k in CAPTURED}
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in CAPTURED}
    where: dict[str, list[torch.Tensor]] = {k: [] for k in CAPTURED}
    rel_w: dict[str, list[torch.Tensor]] = {k: [] for k in CAPTURED}  # 1 / mean(h^2) of the sampled tokens
    n_heavy = min(n_heavy, total // HEAVY_MAX_SHARE)  # a minority by construction, however small the calibration
    heavy = {k: (HeavyTokens(n_heavy), HeavyTokens(n_heavy)) for k in CAPTURED if k not in SEQUENCE_CAPTURED}
    state: dict = {"seq": False, "sel": None, "offset": 0, "weight_sum": 0.0}

    def hook(name: str):
        def fn(module, args, output):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            f32 = flat.float()
            tok_w = state["tok_w"]
            s = ((f32.abs() * tok_w[:, None]) if relative else f32.abs()).sum(0).double()
            sums[name] = sums[name] + s if name in sums else s
            if name in gram_modules:
                g = (f32.t() @ f32).double()
                grams[name] = grams[name] + g if name in grams else g
            if name in SEQUENCE_CAPTURED:
                if state["seq"]:
                    keep[name].append(x.detach().float())
                    outs[name].append(output.detach().float())
                return
            out = output.reshape(-1, output.shape[-1]).float()
            sel = state["sel"]
            if sel.numel():
                keep[name].append(f32[sel])
                outs[name].append(out[sel])
                where[name].append(sel + state["offset"])
                rel_w[name].append(tok_w[sel])
            index = torch.arange(flat.shape[0]) + state["offset"]
            by_in, by_out = heavy[name]
            by_in.offer(f32.pow(2).sum(1), index, f32, out, tok_w)
            by_out.offer(out.pow(2).sum(1), index, f32, out, tok_w)

        return fn

    def run(h: torch.Tensor, keep_seq: bool, offset: int) -> torch.Tensor:
        picked = chosen[offset : offset + h.shape[0] * h.shape[1]]
        state["seq"], state["sel"], state["offset"] = keep_seq, picked.nonzero().squeeze(1), offset
        # each token's weight under the relative loss: 1 / the residual stream's mean square
        state["tok_w"] = 1.0 / h.pow(2).mean(-1).reshape(-1).clamp(min=1e-12)
        state["weight_sum"] += float(state["tok_w"].sum())
        return run_layer(layer, h, rotary)

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in CAPTURED]
    hs, ys, seen, offset = [], [], 0, 0
    try:
        for h in store:
            take = max(0, min(h.shape[0], n_search - seen))
            parts = []
            if take:  # the chunk's first `take` sequences are search sequences
                hs.append(h[:take])
                ys.append(run(h[:take], True, offset))
                parts.append(ys[-1])
            if take < h.shape[0]:
                parts.append(run(h[take:], False, offset + take * h.shape[1]))
            if keep_outputs is not None:
                keep_outputs.append(torch.cat(parts) if len(parts) > 1 else parts[0])
            seen += h.shape[0]
            offset += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
    inputs = {k: torch.cat(keep[k]) for k in SEQUENCE_CAPTURED}
    targets = {k: torch.cat(outs[k]) for k in SEQUENCE_CAPTURED}
    weights: dict[str, torch.Tensor] = {}
    n_heavy_rows: dict[str, int] = {}
    for k, pair in heavy.items():
        if keep[k]:
            sample = (torch.cat(where[k]), torch.cat(keep[k]), torch.cat(outs[k]), torch.cat(rel_w[k]))
        else:  # no random token fell here (tiny inputs): the heavy tokens alone
            sample = (torch.empty(0, dtype=torch.long), *(r[:0] for r in pair[0].rows))
        (inputs[k], targets[k], tok_w), w, n_heavy_rows[k] = merge_heavy(total, sample, list(pair))
        weights[k] = w * tok_w / (w * tok_w).mean() if relative else w
    return LayerCapture(
        h=torch.cat(hs),
        y=torch.cat(ys),
        inputs=inputs,
        targets=targets,
        abs_mean={k: (v / (state["weight_sum"] if relative else total)).float() for k, v in sums.items()},
        weights=weights,
        heavy=n_heavy_rows,
        grams={k: (v.float(), total) for k, v in grams.items()},
    )


# ----------------------------------------------------------------------------- scale search


class _SqErr:
    """Running (weighted) mean of squared error in float64 (chunked evaluation)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """a, b: [..., d]; w: optional weight per row of a (its shape a.shape[:-1])."""
        sq = (a.float() - b.float()).pow(2)
        if w is None:
            self.total += float(sq.sum())
            self.count += a.numel()
        else:
            self.total += float((sq.sum(-1) * w).sum())
            self.count += float(w.sum()) * a.shape[-1]

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan  # nothing weighed: no valid loss


def _chunked_loss(layer, name, x, target, rotary, chunk_tokens: int, weights: torch.Tensor | None = None) -> float:
    """Loss over sequences [S, T, d] or tokens [n, d] (optionally weighted per token), about
    chunk_tokens tokens per call."""
    rows = max(1, chunk_tokens // x.shape[1]) if x.dim() == 3 else chunk_tokens
    err = _SqErr()
    for i in range(0, x.shape[0], rows):
        w = None if weights is None else weights[i : i + rows]
        err.add(run_module(layer, name, x[i : i + rows], rotary), target[i : i + rows], w)
    return err.mean


def _gram_pays(x: torch.Tensor, lin: nn.Linear, n_evals: int) -> bool:
    """Gram form costs n*in^2 once + in^2*out per grid point; running the linear costs n*in*out."""
    n, fin, fout = x.numel() // x.shape[-1], lin.in_features, lin.out_features
    return n * fin * fin + n_evals * fin * fin * fout < n_evals * n * fin * fout


def _gram_of(x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """X^T diag(w) X and the total weight (the token count when unweighted)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if weights is None:
        return flat.t() @ flat, float(flat.shape[0])
    return (flat * weights.view(-1, 1)).t() @ flat, float(weights.sum())


def _linear_loss(lin: nn.Linear, w_fp: torch.Tensor, gram: torch.Tensor, n: float):
    """Output MSE of a lone linear through the Gram matrix G = X^T X of its n inputs: with
    D = W_q - W, mean ||x D^T||^2 = tr(D G D^T) / (n out). Exact, and for wide inputs several times
    cheaper per grid point than running the linear over every token (the bias cancels)."""

    def measure() -> float:
        d = lin.weight.data.float() - w_fp.float()
        v = float(((d @ gram) * d).sum())
        return max(0.0, v) / (n * d.shape[0]) if math.isfinite(v) else math.inf

    return measure


def weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """AutoAWQ's duo term: mean over rows of |w| normalised by its group's max |w|."""
    w = torch.cat(weights, dim=0).float()
    g = spec.validate(w.shape[1])
    grouped = w.reshape(-1, g).abs()
    grouped = grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)
    return grouped.reshape(w.shape).mean(0)


def grid_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    if w_mean is not None:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@torch.no_grad()
def search_scales(
    layer: DecoderLayer, group: ScaleGroup, cap: LayerCapture, spec: QuantSpec, cfg: AwqConfig,
    rotary: RotaryEmbedding,
) -> tuple[torch.Tensor, GroupResult]:
    """Grid search of the scale ratio for one group; the layer is restored before returning."""
    linears = [layer.get_submodule(n) for n in group.linears]
    originals = [lin.weight.data.clone() for lin in linears]
    x, target = cap.inputs[group.inspect], cap.targets[group.inspect]
    weights = cap.weights.get(group.inspect)
    if weights is not None and cfg.search_heavy_weight != 1.0:
        weights = weights.clone()
        weights[: cap.heavy.get(group.inspect, 0)] *= cfg.search_heavy_weight
    x_mean = cap.abs_mean[group.inspect].float()
    if cfg.duo_scaling not in (True, False, "both"):
        raise ValueError(f"AwqConfig.duo_scaling must be True, False or 'both', got {cfg.duo_scaling!r}")
    w_mean = weight_mean(originals, spec) if cfg.duo_scaling else None
    # candidates: (ratio, weight term); "both" appends the activation-only grid to the duo grid
    candidates = [(i / cfg.n_grid, w_mean) for i in range(cfg.n_grid)]
    if cfg.duo_scaling == "both":
        candidates += [(i / cfg.n_grid, None) for i in range(cfg.n_grid)]

    measure = None
    if group.lone and (group.inspect in cap.grams or _gram_pays(x, linears[0], len(candidates))):
        gram, n = cap.grams.get(group.inspect) or _gram_of(x, weights)  # all tokens when captured, else the sample
        measure = _linear_loss(linears[0], originals[0], gram, n)

    def loss_with(scales: torch.Tensor | None) -> float:
        for lin, w in zip(linears, originals):
            if scales is None:
                lin.weight.data = spec.fake(w)
            else:
                lin.weight.data = spec.fake(w * scales.view(1, -1)) / scales.view(1, -1)
        loss = measure() if measure is not None else _chunked_loss(
            layer, group.inspect, x, target, rotary, cfg.chunk_tokens, weights)
        return loss if math.isfinite(loss) else math.inf

    try:
        loss_rtn = loss_with(None)
        best, best_ratio, best_scales, best_duo, losses = math.inf, None, None, None, []
        for ratio, wm in candidates:
            scales = grid_scales(x_mean, wm, ratio)
            loss = loss_with(scales)
            losses.append(loss)
            if loss < best:
                best, best_ratio, best_scales, best_duo = loss, ratio, scales, wm is not None
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    fallback = best_scales is None
    if fallback:
        warnings.warn(
            f"AWQ: layer {layer.self_attn.layer_idx} group {group.name}: no finite loss in the scale search; "
            "this group is quantized without scaling",
            RuntimeWarning,
            stacklevel=2,
        )
        best_scales = torch.ones_like(x_mean)
        best = loss_rtn
    return best_scales, GroupResult(
        group.name, group.prev, list(group.linears), best_ratio, _finite(loss_rtn), _finite(best),
        [_finite(v) for v in losses], fallback, best_duo,
    )


def _finite(v: float) -> float:
    """JSON-safe loss: inf/NaN are recorded as -1."""
    return v if math.isfinite(v) else -1.0


@torch.no_grad()
def apply_scales(layer: DecoderLayer, group: ScaleGroup, scales: torch.Tensor, cap: LayerCapture | None = None) -> None:
    """Fold 1/s into the op before the group and s into the group's weight columns.

    Exact in fp arithmetic: prev(x)/s @ (W*s)^T == prev(x) @ W^T. The captured inputs of the
    group are divided too, so the clip search sees what the scaled weights will see.
    """
    s = scales.float()
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        prev.weight.data[-s.numel():].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data[-s.numel():].div_(s.to(prev.bias.dtype))
    else:  # RMSNorm: y = weight * normalised(x)
        prev.weight.data.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = layer.get_submodule(name)
        lin.weight.data.mul_(s.view(1, -1).to(lin.weight.dtype))
    if cap is not None:
        cap.inputs[group.inspect].div_(s)


# ----------------------------------------------------------------------------- clip search


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


# ----------------------------------------------------------------------------- one layer


@torch.no_grad()
def layer_output_error(layer: DecoderLayer, cap: LayerCapture, rotary: RotaryEmbedding, chunk_seq: int) -> float:
    err = _SqErr()
    for i in range(0, cap.h.shape[0], chunk_seq):
        err.add(run_layer(layer, cap.h[i : i + chunk_seq], rotary), cap.y[i : i + chunk_seq])
    return _finite(err.mean)


@torch.no_grad()
def rtn_layer_error(layer: DecoderLayer, cap: LayerCapture, spec: QuantSpec, rotary: RotaryEmbedding, chunk_seq: int) -> float:
    """The layer-output error plain RTN would give on the same inputs (for the RTN-vs-AWQ report)."""
    originals = {n: layer.get_submodule(n).weight.data.clone() for n in linear_names(layer)}
    try:
        load_dequantized_(layer, rtn_quantize_layer(layer, spec))
        return layer_output_error(layer, cap, rotary, chunk_seq)
    finally:
        for n, w in originals.items():
            layer.get_submodule(n).weight.data = w


@torch.no_grad()
def awq_quantize_layer(
    layer: DecoderLayer,
    rotary: RotaryEmbedding,
    store: ActivationStore,
    spec: QuantSpec,
    cfg: AwqConfig,
    index: int = 0,
) -> tuple[dict[str, QuantizedWeight], LayerResult, ActivationStore | None]:
    """Search scales and clips for one layer, fold them in and quantize it.

    On return the layer's Linear weights hold their dequantized values (the module computes what
    the quantized checkpoint will), ready to carry the calibration activations to the next layer
    (`propagate`). With cfg.carry == "fp" the fp outputs collected on the way are returned instead.
    """
    if cfg.carry not in ("quantized", "fp"):
        raise ValueError(f"AwqConfig.carry must be 'quantized' or 'fp', got {cfg.carry!r}")
    t0 = time.perf_counter()
    seqlen = next(iter(store)).shape[1]
    chunk_seq = chunk_sequences(seqlen, cfg.chunk_tokens)
    n_search = store.n_sequences if cfg.search_samples is None else min(cfg.search_samples, store.n_sequences)
    fp_out = ActivationStore(store.compact) if cfg.carry == "fp" else None
    groups = scale_groups(layer)
    lone = tuple(g.inspect for g in groups if g.lone) if cfg.gram_all_tokens else ()
    cap = capture(layer, rotary, store, n_search, cfg.search_tokens, fp_out, lone, cfg.heavy_tokens, cfg.relative_loss)
    err_rtn = rtn_layer_error(layer, cap, spec, rotary, chunk_seq)

    found = [search_scales(layer, g, cap, spec, cfg, rotary) for g in groups]
    for g, (scales, _) in zip(groups, found):
        apply_scales(layer, g, scales, cap)

    thresholds, clips = clip_layer(layer, cap, spec, cfg) if cfg.clip else ({}, [])
    qweights: dict[str, QuantizedWeight] = {}
    for name in linear_names(layer):
        lin = layer.get_submodule(name)
        if name in thresholds:
            lin.weight.data = clamp_groups(lin.weight.data, thresholds[name])
        qweights[name] = spec.quantize(lin.weight.data)
    load_dequantized_(layer, qweights)
    err_awq = layer_output_error(layer, cap, rotary, chunk_seq)
    result = LayerResult(index, [r for _, r in found], clips, err_rtn, err_awq, time.perf_counter() - t0)
    return qweights, result, fp_out


def clamp_groups(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each (row, group) of w [out, in] to +-max_val [out, n_groups]."""
    out_f, n_groups = max_val.shape
    mv = max_val.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.reshape(out_f, n_groups, -1), -mv, mv).reshape(w.shape)


@torch.no_grad()
def propagate(layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, compact: bool = True) -> ActivationStore:
    """Run the (quantized) layer over every calibration chunk: the next layer's inputs."""
    out = ActivationStore(compact)
    for h in store:
        out.append(run_layer(layer, h, rotary))
    return out
