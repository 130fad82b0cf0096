"""AWQ's settings, the scale groups of a decoder layer, and the records its searches pass around
and report (see quant/awq.py for the method)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models.transformer import DecoderLayer


@dataclass
class AwqConfig:
    """Search settings (the quantization grid itself is the QuantSpec)."""

    n_grid: int = 20
    duo_scaling: bool = True  # True: AutoAWQ's duo term (weights too); False: activations only (llm-awq)
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    search_samples: int | None = 8  # whole sequences for the attention search and the error report (None: all)
    search_tokens: int | None = 4096  # tokens sampled from all calibration data for the per-token searches (None: all)
    heavy_tokens: int = 128  # per criterion (largest input / output norm): always in the per-token samples, at their true weight
    # Weight each token by 1 / mean(h^2) of its layer input, in the per-token searches (scale and
    # clip) and in the per-channel mean |x| the scale grid is built on: error relative to the
    # residual stream, which is what the next RMSNorm passes on. Measured (W4 g64, 128 x 512,
    # ppl16; AWQ / compressed-tensors format): absolute 24.28 / 24.31; relative losses 24.16 /
    # 24.03; relative losses and mean 24.04 / 24.01. (On a second machine, losses only: 24.49 ->
    # 23.97, seed 1 24.43 -> 24.06.) Weighting the attention search's positions changed nothing.
    relative_loss: bool = True
    chunk_tokens: int = 2048  # tokens per forward call (bounds activation and attention memory)

    def __post_init__(self) -> None:
        if not isinstance(self.duo_scaling, bool):
            raise ValueError(f"AwqConfig.duo_scaling must be True or False, got {self.duo_scaling!r}")


# ----------------------------------------------------------------------------- scale groups


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


# ----------------------------------------------------------------------------- records


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


@dataclass
class GroupResult:
    name: str
    prev: str
    linears: list[str]
    ratio: float | None  # the chosen grid ratio; None when the search fell back to no scaling
    loss_rtn: float  # plain RTN of the group (no scaling)
    loss_awq: float  # with the chosen scales
    losses: list[float] = field(default_factory=list)  # per grid point
    fallback: bool = False


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


def finite(v: float) -> float:
    """JSON-safe loss: inf/NaN are recorded as -1."""
    return v if math.isfinite(v) else -1.0
