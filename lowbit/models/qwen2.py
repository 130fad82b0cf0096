"""Qwen2ForCausalLM: Llama-family decoder with biases on the q/k/v projections."""
from .registry import ArchSpec, register

SPEC = register(ArchSpec("Qwen2ForCausalLM", qkv_bias=True))
