"""SamplingParams: per-request generation settings, named as vLLM users know them."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LowbitError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 / 0 -> disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None -> up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per sampled token (0 = only the chosen)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise LowbitError(f"invalid sampling parameter: {msg}")

        if not (1 <= self.n <= 64):
            bad(f"n must be in [1, 64], got {self.n}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < -1:
            bad(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if not (0 <= self.min_p <= 1):
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (-2 <= self.presence_penalty <= 2) or not (-2 <= self.frequency_penalty <= 2):
            bad("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for lp in (self.logprobs, self.prompt_logprobs):
            if lp is not None and not (0 <= lp <= MAX_LOGPROBS):
                bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {lp}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            bad("stop: at most 16 non-empty strings of at most 256 characters")
