"""LlamaForCausalLM: the plain Llama-family decoder (RMSNorm, rotary, GQA, SwiGLU)."""
from .registry import ArchSpec, register

SPEC = register(ArchSpec(
    "LlamaForCausalLM", "llama", gguf_name="llama", gguf_permuted_qk=True,
    gguf_config={"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"},
))
