"""Offline batch API (vLLM's `LLM`): generate / chat over many prompts, results in input order."""
from __future__ import annotations

from typing import Any

from ..errors import LowbitError
from .args import EngineArgs
from .chat_template import apply_chat_template
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = str | list[int]  # what the engine takes
PromptInput = str | list[int] | dict[str, Any]  # what generate() takes (vLLM's shapes)


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

    def close(self) -> None:
        """Stops the tensor-parallel workers (also done at exit); the LLM cannot generate after."""
        self.engine.close()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | list[PromptInput] | list[int],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Outputs in prompt order. A prompt is a string, a list of token ids, {"prompt": str} or
        {"prompt_token_ids": [...]} (vLLM's TextPrompt / TokensPrompt); pass one or a list of them."""
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


_PROMPT_KEYS = ("prompt", "prompt_token_ids")


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """vLLM's prompt shapes -> one engine prompt each: a string, a list of token ids, a TextPrompt
    {"prompt": str}, a TokensPrompt {"prompt_token_ids": [...]}, or a list mixing any of them."""
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts, None)]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise LowbitError("no prompts given")
        if all(isinstance(p, int) for p in prompts):
            return [list(prompts)]  # one prompt of token ids
        return [_one_prompt(p, i) for i, p in enumerate(prompts)]
    raise LowbitError("prompts must be a string, a list of token ids, a dict with 'prompt' or 'prompt_token_ids', "
                      f"or a list of these, got {type(prompts).__name__}")


def _one_prompt(p: Any, index: int | None) -> Prompt:
    where = "" if index is None else f"prompt {index}: "
    if isinstance(p, str):
        return p
    if isinstance(p, (list, tuple)):
        return list(p)  # token ids: the engine checks each one
    if isinstance(p, dict):
        unknown = sorted(str(k) for k in p if k not in _PROMPT_KEYS)
        if unknown:
            raise LowbitError(f"{where}unsupported prompt field(s) {unknown}; a prompt dict takes 'prompt' (text) "
                              "or 'prompt_token_ids'")
        if len(p) != 1:
            raise LowbitError(f"{where}a prompt dict takes exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if "prompt" in p:
            if not isinstance(p["prompt"], str):
                raise LowbitError(f"{where}'prompt' must be a string, got {type(p['prompt']).__name__}")
            return p["prompt"]
        ids = p["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)):
            raise LowbitError(f"{where}'prompt_token_ids' must be a list of token ids, got {type(ids).__name__}")
        return list(ids)
    raise LowbitError(f"{where}each prompt must be a string, a list of token ids, or a dict with 'prompt' or "
                      f"'prompt_token_ids', got {type(p).__name__}")
