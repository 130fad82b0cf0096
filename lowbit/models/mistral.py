"""MistralForCausalLM: the plain Llama-family decoder (RMSNorm, rotary, GQA, SwiGLU)."""
from .registry import ArchSpec, register

SPEC = register(ArchSpec("MistralForCausalLM", "mistral"))
