"""Turning prompts and chat messages into token ids with the model's own tokenizer.

Chat messages use the model's chat template when it has one; otherwise
sluice's plain template, one line per message and an open assistant turn::

    System: You are terse.
    User: Name a river.
    Assistant:
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2

from sluice.common.v1 import generation_pb2 as common_pb2
from sluice_core.messages import ROLE_NAMES


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (say, two user turns in a row)."""


def render_plain(messages: Sequence[common_pb2.ChatMessage]) -> str:
    """The plain chat template, for models without one of their own."""
    lines = [f"{ROLE_NAMES[m.role].capitalize()}: {m.content}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


class HfPromptTokenizer:
    """Wraps a Hugging Face tokenizer (``transformers.PreTrainedTokenizerBase``)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.longest_token_chars = max(map(len, tokenizer.get_vocab()), default=1)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=True)
        return ids

    def encode_chat(self, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        if not self.has_chat_template:
            return self.encode(render_plain(messages))
        conversation = [{"role": ROLE_NAMES[m.role], "content": m.content} for m in messages]
        try:
            text: str = self._tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:  # the template's own raise_exception(...)
            raise ChatTemplateError(str(exc)) from exc
        # Chat templates write their own special tokens (BOS included).
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids
