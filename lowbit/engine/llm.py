"""Offline batch API (vLLM's `LLM`): generate / chat over many prompts, results in input order."""
from __future__ import annotations

from typing import Any

from ..errors import LowbitError
from .args import EngineArgs
from .chat_template import apply_chat_template
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        try:
            args = EngineArgs(model=model, **engine_args)
        except TypeError as e:
            raise LowbitError(f"unknown engine argument: {e}") from None
        self.engine = LLMEngine(args)
        self._counter = 0

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine, llm._counter = engine, 0
        return llm

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        return self._run(_as_prompt_list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several (a list of such lists)."""
        convs = messages if messages and isinstance(messages, list) and isinstance(messages[0], list) else [messages]
        prompts = [apply_chat_template(self.engine.tokenizer, c, add_generation_prompt) for c in convs]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Prompt], params: Any, use_tqdm: bool) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LowbitError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, plist):
                self._counter += 1
                rid = f"llm-{self._counter}"
                self.engine.add_request(rid, p, sp)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)  # nothing half-queued stays behind
            raise
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while len(done) < len(ids):
                if not self.engine.has_unfinished():
                    raise RuntimeError("engine stopped with requests unanswered")
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([r for r in ids if r not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise LowbitError("no prompts given")
        if all(isinstance(p, int) for p in prompts):
            return [list(prompts)]
        out: list[Prompt] = []
        for p in prompts:
            if not isinstance(p, (str, list, tuple)):
                raise LowbitError(f"each prompt must be a string or a list of token ids, got {type(p).__name__}")
            out.append(p if isinstance(p, str) else list(p))
        return out
    raise LowbitError(f"prompts must be a string, a list of strings or token id lists, got {type(prompts).__name__}")
