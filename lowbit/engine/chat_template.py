"""Chat messages -> prompt token ids through the tokenizer's own chat template."""
from __future__ import annotations

from typing import Any

from ..errors import LowbitError

_ROLES = ("system", "user", "assistant", "tool", "developer")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """A non-empty list of {"role": ..., "content": str or list of parts} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LowbitError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LowbitError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise LowbitError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        content = m.get("content")
        if not isinstance(content, (str, list)) and not (content is None and m.get("tool_calls")):
            raise LowbitError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    return list(messages)


def apply_chat_template(tokenizer: Any, messages: Any, add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` with the tokenizer's chat template (plus the assistant prompt) and tokenize."""
    messages = validate_messages(messages)
    if tokenizer is None:
        raise LowbitError("this model has no tokenizer, so it cannot format chat messages")
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template; send a plain prompt instead")
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    except Exception as e:  # a template raising on an unexpected message sequence (jinja exception)
        raise LowbitError(f"chat template failed on these messages: {e}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(t) for t in ids]
