"""Qwen2ForCausalLM: Llama-family decoder with biases on the q/k/v projections."""
from .registry import ArchSpec, register

NO_SLIDING_WINDOW = {"use_sliding_window": False, "sliding_window": None}

SPEC = register(ArchSpec(
    "Qwen2ForCausalLM", "qwen2", qkv_bias=True, gguf_name="qwen2",
    gguf_config={"hidden_act": "silu", **NO_SLIDING_WINDOW},
))
