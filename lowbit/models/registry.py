"""Registry of supported architectures: adding one is a small file calling `register`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitectureError
from .config import ModelConfig, config_from_hf


@dataclass(frozen=True)
class ArchSpec:
    """Structural differences between Llama-family decoders."""

    name: str  # the `architectures` entry in config.json, e.g. "LlamaForCausalLM"
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rotary


_ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    _ARCHS[spec.name] = spec
    return spec


def supported_architectures() -> list[str]:
    _load_builtin()
    return sorted(_ARCHS)


def _load_builtin() -> None:
    from . import llama, mistral, qwen2, qwen3  # noqa: F401  (each registers itself)


def resolve_config(hf: dict[str, Any]) -> ModelConfig:
    _load_builtin()
    names = hf.get("architectures") or []
    for name in names:
        if name in _ARCHS:
            spec = _ARCHS[name]
            return config_from_hf(hf, spec.name, qkv_bias=spec.qkv_bias, qk_norm=spec.qk_norm)
    got = ", ".join(names) if names else f"model_type={hf.get('model_type')!r} with no 'architectures'"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}"
    )
