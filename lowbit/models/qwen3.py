"""Qwen3ForCausalLM: Llama-family decoder with per-head RMSNorm on q and k (no q/k/v biases)."""
from .registry import ArchSpec, register

SPEC = register(ArchSpec("Qwen3ForCausalLM", qk_norm=True))
