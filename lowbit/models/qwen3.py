"""Qwen3ForCausalLM: Llama-family decoder with per-head RMSNorm on q and k (no q/k/v biases)."""
from .qwen2 import NO_SLIDING_WINDOW
from .registry import ArchSpec, register

SPEC = register(ArchSpec(
    "Qwen3ForCausalLM", "qwen3", qk_norm=True, gguf_name="qwen3",
    gguf_config={"attention_bias": False, "hidden_act": "silu", **NO_SLIDING_WINDOW},
))
