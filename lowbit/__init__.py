"""lowbit: AWQ/RTN weight quantization and a paged-KV CPU engine with vLLM's offline API.

    from lowbit import LLM, SamplingParams
    outputs = LLM().generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))

The names below are imported on first use (module __getattr__), so `import lowbit`, and every
`import lowbit.<subpackage>` that runs this file first, stays free of torch and the engine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine.args import EngineArgs
    from .engine.llm import LLM
    from .engine.outputs import CompletionOutput, RequestOutput
    from .engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from .engine.llm import LLM as value
    elif name == "SamplingParams":
        from .engine.sampling_params import SamplingParams as value
    elif name == "RequestOutput":
        from .engine.outputs import RequestOutput as value
    elif name == "CompletionOutput":
        from .engine.outputs import CompletionOutput as value
    elif name == "EngineArgs":
        from .engine.args import EngineArgs as value
    else:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
