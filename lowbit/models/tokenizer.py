"""A tokenizer whose per-token calls skip the transformers import.

Importing transformers costs about a second, a third of `lowbit generate`'s whole start-up. The engine's
own calls (encode the prompt, decode the tokens, map ids to token strings, the eos id) go straight to the
`tokenizers` library, which is what transformers' fast tokenizer calls for them too. Everything else
(chat templates, `tokenizer(text, return_tensors=...)`, any attribute lowbit does not define) goes to the
transformers tokenizer, loaded on first use, so their behaviour is transformers' own.

`fast_tokenizer_or_none` takes this path only when the files leave transformers nothing to change in the
backend it would build (no add_bos/add_eos rewrite of the post-processor, special tokens already in
tokenizer.json, no truncation or padding, no space clean-up); anything else loads transformers at once.
tests/test_tokenizer.py compares both on the same texts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tokenizer_config.json classes that are exactly the tokenizers-library backend (transformers v5 names
# the class TokenizersBackend and keeps PreTrainedTokenizerFast as its alias)
FAST_BACKEND_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# keys that change nothing the engine's calls see (the chat template is rendered by transformers)
_INERT_KEYS = frozenset({
    "tokenizer_class", "backend", "chat_template", "model_max_length", "padding_side", "truncation_side",
    "model_input_names", "add_prefix_space", "errors", "clean_up_tokenization_spaces", "added_tokens_decoder",
    "split_special_tokens", "extra_special_tokens", "additional_special_tokens", *_SPECIAL_KEYS,
})


def _token_str(v: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class FastTokenizer:
    def __init__(self, model_dir: Path, backend: Any, config: dict[str, Any]) -> None:
        self.name_or_path = str(model_dir)
        self._backend = backend
        self._hf: Any = None
        for key in _SPECIAL_KEYS:
            token = _token_str(config.get(key))
            setattr(self, key, token)
            setattr(self, key + "_id", None if token is None else backend.token_to_id(token))

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if kwargs:
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if kwargs:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        if skip_special_tokens:
            return self.hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def hf(self) -> Any:
        """The transformers tokenizer for the same files, loaded on first use."""
        if self._hf is None:
            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast.from_pretrained(self.name_or_path)
        return self._hf

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never for private state (also keeps copy/pickle probing off transformers)
            raise AttributeError(name)
        return getattr(self.hf, name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fast_tokenizer_or_none(model_dir: Path) -> FastTokenizer | None:
    """FastTokenizer when the files qualify (see the module docstring), else None."""
    config = _read_json(model_dir / "tokenizer_config.json")
    if not isinstance(config, dict) or config.get("tokenizer_class") not in FAST_BACKEND_CLASSES:
        return None
    if set(config) - _INERT_KEYS or config.get("split_special_tokens") or config.get("clean_up_tokenization_spaces"):
        return None
    model_type = (_read_json(model_dir / "config.json") or {}).get("model_type", "")
    if "tral" in str(model_type):  # transformers may rewrite a Mistral-family pre-tokenizer's regex
        return None
    from tokenizers import Tokenizer

    try:  # tokenizer.json is parsed once, here, and checked on the object it gives
        backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception:
        return None  # transformers will report what is wrong with it
    if backend.truncation or backend.padding or backend.post_processor is None:
        return None
    added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    wanted = [_token_str(config.get(k)) for k in _SPECIAL_KEYS]
    wanted += [_token_str(v) for v in (config.get("added_tokens_decoder") or {}).values()]
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = config.get(key) or []
        wanted += [_token_str(v) for v in (extra.values() if isinstance(extra, dict) else extra)]
    if any(t is not None and t not in added for t in wanted):
        return None  # transformers would add it to the backend first
    return FastTokenizer(model_dir, backend, config)
