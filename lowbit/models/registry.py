"""Registry of supported architectures: adding one is a small file calling `register`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedArchitectureError
from .config import ModelConfig, config_from_hf


@dataclass(frozen=True)
class ArchSpec:
    """Structural differences between Llama-family decoders, and how llama.cpp names and stores
    each one (what the GGUF import needs to rebuild an HF directory)."""

    name: str  # the `architectures` entry in config.json, e.g. "LlamaForCausalLM"
    model_type: str = ""  # config.json's "model_type", e.g. "llama"
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rotary
    gguf_name: str | None = None  # llama.cpp's general.architecture; None: not imported from GGUF
    gguf_permuted_qk: bool = False  # llama.cpp reorders llama's q/k rows for its rope layout
    # config.json entries the GGUF metadata does not hold (fixed for the architecture)
    gguf_config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


_ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    _ARCHS[spec.name] = spec
    return spec


def supported_architectures() -> list[str]:
    _load_builtin()
    return sorted(_ARCHS)


def gguf_architectures() -> dict[str, ArchSpec]:
    """llama.cpp architecture name -> spec, for the architectures a GGUF can be imported from."""
    _load_builtin()
    return {s.gguf_name: s for s in sorted(_ARCHS.values(), key=lambda s: s.gguf_name or "") if s.gguf_name}


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
