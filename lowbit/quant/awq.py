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
    then all scales are folded in, so the fp function is unchanged before rounding (awq_scale).
  * clipping: per (output row, group) threshold, skipped for q and k (awq_clip).
  * a group whose search finds no finite loss falls back to no scaling (warning, no NaN).

lowbit's own choices, for speed on a CPU: the per-channel statistics use every calibration
token, the attention search uses the first `search_samples` sequences only, the per-token
searches (MLP, down_proj, clip) a sample of tokens, and activations carried between layers are
stored in float16 when they fit (ActivationStore). The token samples are stratified: the tokens
of largest norm (the attention sinks, whose massive activations a middle layer writes) are always
in them, the rest drawn at random and weighted up (capture.HeavyTokens): at their true weight in
the clip search, and left out of the scale searches (awq_scale.HEAVY_SEARCH_WEIGHT).
llm-awq gets the sinks into its clip sample by its stride (at ~128x their frequency); a random
sample holds about one and lets the clip search cut the weights that make them.

This module is the driver: one fp pass gathers the statistics (capture), then the searches run
and the layer is quantized (awq_quantize_layer).
"""
from __future__ import annotations

import time

import torch

from ..errors import QuantizationError
from ..layers.rotary import RotaryEmbedding
from ..models.transformer import DecoderLayer
from .activations import ActivationStore, chunk_sequences, run_layer
from .awq_clip import clamp_groups, clip_layer
from .awq_config import AwqConfig, LayerCapture, LayerResult, finite, scale_groups
from .awq_scale import SqErr, apply_scales, search_scales
from .capture import ActivationCapture, ChannelAbsMean, SequenceSample, TokenSample, sample_tokens
from ..layers.qweight import QuantizedWeight
from .rtn import QuantSpec, linear_names, load_dequantized_, rtn_quantize_layer

HEAVY_MAX_SHARE = 64  # at most 1/64 of the calibration tokens count as heavy (per criterion)
CAPTURED = ("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj")
SEQUENCE_CAPTURED = ("self_attn",)  # attention mixes tokens: captured as whole sequences


@torch.no_grad()
def capture(
    layer: DecoderLayer, rotary: RotaryEmbedding, store: ActivationStore, n_search: int, n_tokens: int | None,
    n_heavy: int = 0, relative: bool = False,
) -> LayerCapture:
    """One fp pass over all calibration chunks. Keeps: the per-channel mean |x| of every scaled
    input over all tokens; the attention's inputs/outputs (and the layer's) for the first n_search
    sequences, since attention needs whole sequences; and for the per-token modules (o_proj, MLP,
    down_proj) n_tokens tokens drawn at random (seeded) from all calibration tokens plus the
    n_heavy tokens of largest input and of largest output norm, with weights (see merge_heavy);
    relative: those weights, and each token's share of the mean |x|, divided by its mean square of
    the layer input."""
    total = store.n_tokens
    n_heavy = min(n_heavy, total // HEAVY_MAX_SHARE)  # a minority by construction, however small the calibration
    means = {k: ChannelAbsMean(weighted=relative) for k in CAPTURED}
    sequences = {k: SequenceSample() for k in SEQUENCE_CAPTURED}
    samples = {k: TokenSample(n_heavy) for k in CAPTURED if k not in SEQUENCE_CAPTURED}
    stats = {k: [means[k], sequences[k] if k in sequences else samples[k]] for k in CAPTURED}
    searched = ActivationCapture(layer, rotary, stats, sample_tokens(total, n_tokens)).run(store, n_search)
    if searched is None:
        raise QuantizationError("AWQ searches on at least one whole calibration sequence (search_samples >= 1)")
    h, y = searched
    inputs = {k: s.inputs() for k, s in sequences.items()}
    targets = {k: s.outputs() for k, s in sequences.items()}
    weights: dict[str, torch.Tensor] = {}
    heavy: dict[str, int] = {}
    for k, s in samples.items():
        got = s.merged(total)
        inputs[k], targets[k], heavy[k] = got.inputs, got.outputs, got.n_heavy
        w = got.weight
        weights[k] = w * got.token_weight / (w * got.token_weight).mean() if relative else w
    return LayerCapture(
        h=h, y=y, inputs=inputs, targets=targets,
        abs_mean={k: m.mean() for k, m in means.items()}, weights=weights, heavy=heavy,
    )


@torch.no_grad()
def layer_output_error(layer: DecoderLayer, cap: LayerCapture, rotary: RotaryEmbedding, chunk_seq: int) -> float:
    err = SqErr()
    for i in range(0, cap.h.shape[0], chunk_seq):
        err.add(run_layer(layer, cap.h[i : i + chunk_seq], rotary), cap.y[i : i + chunk_seq])
    return finite(err.mean)


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
) -> tuple[dict[str, QuantizedWeight], LayerResult]:
    """Search scales and clips for one layer, fold them in and quantize it.

    On return the layer's Linear weights hold their dequantized values (the module computes what
    the quantized checkpoint will), ready to carry the calibration activations to the next layer
    (`propagate`): the next layer is calibrated on the quantized layer's outputs.
    """
    t0 = time.perf_counter()
    seqlen = next(iter(store)).shape[1]
    chunk_seq = chunk_sequences(seqlen, cfg.chunk_tokens)
    n_search = store.n_sequences if cfg.search_samples is None else min(cfg.search_samples, store.n_sequences)
    groups = scale_groups(layer)
    cap = capture(layer, rotary, store, n_search, cfg.search_tokens, cfg.heavy_tokens, cfg.relative_loss)
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
    return qweights, result
