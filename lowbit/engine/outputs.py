"""Request outputs in the shape vLLM users know (RequestOutput with one CompletionOutput per sample)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..logprobs import SampleLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache / session
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished times (time.monotonic)
