"""Turning prompts and chat messages into token ids with the model's own tokenizer.

Chat messages use the model's chat template when it has one; otherwise
sluice's plain template, one line per message and an open assistant turn::

    System: You are terse.
    User: Name a river.
    Assistant:
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from sluice.common.v1 import common_pb2
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


class FastPromptTokenizer:
    """A model directory's tokenizer through the tokenizers library alone, without transformers.

    transformers imports torch, seconds of start-up that the simulated engine
    does without. The ids are the same: a Hugging Face fast tokenizer is this
    ``tokenizer.json``, and the chat template is rendered the way
    transformers renders it (a sandboxed jinja2 with its helpers and the
    model's special tokens).
    """

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = read_json(model_dir / "tokenizer_config.json")
        self._special = {
            name: value["content"] if isinstance(value, dict) else value
            for name, value in config.items()
            if name.endswith("_token") and isinstance(value, str | dict)
        }
        source = _chat_template(model_dir, config)
        self._template = _jinja().from_string(source) if source else None
        self.has_chat_template = self._template is not None
        self.longest_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=True).ids
        return ids

    def encode_chat(self, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        if self._template is None:
            return self.encode(render_plain(messages))
        conversation = [{"role": ROLE_NAMES[m.role], "content": m.content} for m in messages]
        try:
            text = self._template.render(messages=conversation, add_generation_prompt=True, **self._special)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids


def read_json(path: Path) -> dict[str, Any]:
    """A model directory's JSON file; empty when the model has none."""
    if not path.is_file():
        return {}
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """Where transformers looks: ``chat_template.jinja``, else the tokenizer config's (its default, if several)."""
    file = model_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template") or read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _jinja() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env
