"""ModelConfig: the few numbers our decoder needs, read from a Hugging Face config.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError
from ..layers.rotary import RopeConfig


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; older configs use rope_theta + rope_scaling.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype not in ("default", "linear", "llama3"):
        raise ModelLoadError(f"unsupported rope scaling type {rtype!r} (supported: default, linear, llama3)")
    return RopeConfig(
        theta=theta,
        type=rtype,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


def config_from_hf(d: dict[str, Any], architecture: str, *, qkv_bias: bool, qk_norm: bool) -> ModelConfig:
    """Build a ModelConfig from a config.json dict; the architecture spec supplies the structural flags."""
    try:
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        return ModelConfig(
            architecture=architecture,
            model_type=str(d.get("model_type", "")),
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope=_rope_from_hf(d),
            qkv_bias=qkv_bias or bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=qk_norm,
            sliding_window=int(window) if window else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_list(d.get("eos_token_id")),
            hf_config=d,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json is missing or has a bad value for {e}") from None
