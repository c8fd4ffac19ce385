"""An OpenAI request body, checked as a hostile caller's, into a ``GenerateRequest``.

Every field OpenAI's API (or vLLM's, for its extensions) defines is either
mapped one to one onto sluice's sampling parameters, accepted for what it
is, or refused with a 400 naming it when set to anything but its default:
a request is never served with a field silently ignored. Limits on values
(lengths, ranges) are the queue's: it answers INVALID_ARGUMENT naming the
field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_core.errors import bounded
from sluice_openai.errors import invalid

Kind = Literal["chat", "completion"]

# Optional numbers that map onto SamplingParams fields of the same name.
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
# Whole numbers, with the largest their SamplingParams field holds.
_UINTS = {"seed": 2**63 - 1, "min_tokens": 2**32 - 1}
_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,  # OpenAI's newer name for the system message
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}
_PRIORITIES = {"interactive": generation_pb2.PRIORITY_INTERACTIVE, "batch": generation_pb2.PRIORITY_BATCH}

# Fields sluice cannot honour, with the values that mean "not asked for".
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "prompt_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}
# Accepted, with no effect on the answer: "user" names the caller's end user for
# OpenAI's abuse checks; the others only qualify fields refused above when set.
_IGNORED = frozenset({"user", "parallel_tool_calls", "store", "metadata", "service_tier"})
_MAPPED = frozenset(
    {"model", "stream", "stream_options", "max_tokens", "stop", "top_k", "ignore_eos", "priority", *_FLOATS, *_UINTS}
)
_FIELDS: dict[Kind, frozenset[str]] = {
    "completion": frozenset({"prompt", *_MAPPED, *_IGNORED, *_UNSUPPORTED}),
    "chat": frozenset({"messages", "max_completion_tokens", *_MAPPED, *_IGNORED, *_UNSUPPORTED}),
}


@dataclass(frozen=True)
class Call:
    """What one HTTP request asks of the Generation API, and how to answer it."""

    kind: Kind
    request: generation_pb2.GenerateRequest
    model: str  # "" when the request names none: the served model
    stream: bool
    include_usage: bool


def parse(kind: Kind, body: object, headers: Mapping[str, str], default_max_tokens: int) -> Call:
    """The call ``body`` (parsed JSON) and sluice's headers ask for; OpenAIError 400 if it cannot be served."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS[kind])
    if unknown:
        raise invalid(f"unrecognized request argument(s): {_names(unknown)}", param=_name(unknown[0]))
    unsupported = sorted(k for k, defaults in _UNSUPPORTED.items() if k in body and not _default(body[k], defaults))
    if unsupported:
        raise invalid(f"not supported by sluice: {_names(unsupported)}", param=unsupported[0])
    request = generation_pb2.GenerateRequest(
        sampling=_sampling(kind, body, default_max_tokens), priority=_priority(body, headers)
    )
    if kind == "chat":
        request.messages.CopyFrom(_messages(body.get("messages")))
    else:
        request.prompt = _prompt(body.get("prompt"))
    request.conversation_id = _text(headers.get("x-sluice-conversation", ""), "x-sluice-conversation")
    request.client_request_id = _text(headers.get("x-client-request-id", ""), "x-client-request-id")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options takes only include_usage", param="stream_options")
    include_usage = _bool(options or {}, "include_usage", "stream_options.include_usage")
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", param="model")
    return Call(kind, request, _text(model or "", "model"), stream, include_usage)


def _sampling(kind: Kind, body: dict[str, object], default_max_tokens: int) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(max_tokens=_max_tokens(kind, body, default_max_tokens))
    for name in _FLOATS:
        if (value := _number(body, name)) is not None:
            setattr(sampling, name, value)
    for name, largest in _UINTS.items():
        if (value := _uint(body, name, largest)) is not None:
            setattr(sampling, name, value)
    top_k = body.get("top_k")
    if top_k is not None:
        # vLLM's -1 means off, as sluice's 0 does.
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1 or top_k >= 2**32:
            raise invalid("top_k must be an integer, -1 or 0 for off", param="top_k")
        sampling.top_k = max(0, top_k)
    sampling.ignore_eos = _bool(body, "ignore_eos")
    sampling.stop.extend(_stop(body.get("stop")))
    return sampling


def _max_tokens(kind: Kind, body: dict[str, object], default: int) -> int:
    given = _uint(body, "max_completion_tokens", 2**32 - 1) if kind == "chat" else None
    legacy = _uint(body, "max_tokens", 2**32 - 1)
    if given is not None and legacy is not None and given != legacy:
        raise invalid("max_tokens and max_completion_tokens differ: send one", param="max_tokens")
    value = given if given is not None else legacy
    if value == 0:
        raise invalid("max_tokens must be at least 1", param="max_tokens")
    return default if value is None else value


def _priority(body: dict[str, object], headers: Mapping[str, str]) -> generation_pb2.Priority.ValueType:
    header = headers.get("x-sluice-priority")
    if header is not None:
        if header.lower() not in _PRIORITIES:
            raise invalid("x-sluice-priority must be interactive or batch", param="x-sluice-priority")
        return _PRIORITIES[header.lower()]
    # vLLM's field: lower values are served first; 0, its default, is a person waiting.
    value = body.get("priority")
    if value is None:
        return generation_pb2.PRIORITY_UNSPECIFIED
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid("priority must be an integer (0 or less: interactive; above 0: batch)", param="priority")
    return generation_pb2.PRIORITY_BATCH if value > 0 else generation_pb2.PRIORITY_INTERACTIVE


def _prompt(value: object) -> str:
    if isinstance(value, str):
        return _text(value, "prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return _text(value[0], "prompt")
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise invalid("prompts of token ids are not supported by sluice: send text", param="prompt")
    if isinstance(value, list) and len(value) > 1:
        raise invalid("one prompt per request: sluice does not batch prompts in one request", param="prompt")
    raise invalid("prompt must be a string", param="prompt")


def _messages(value: object) -> common_pb2.ChatMessages:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list", param="messages")
    messages = common_pb2.ChatMessages()
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            # Bounded: the role is the caller's text.
            shown = bounded(str(role), 32)
            raise invalid(f"{where}.role {shown!r} is not supported: system, developer, user or assistant", where)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise invalid(f"{where} has fields sluice does not support: {_names(extra)}", param=where)
        if not isinstance(message.get("name", ""), str):
            raise invalid(f"{where}.name must be a string", param=f"{where}.name")
        messages.messages.add(role=_ROLES[role], content=_content(message.get("content"), where))
    return messages


def _content(value: object, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return _text(value, f"{where}.content")
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content: only text parts are supported", param=f"{where}.content")
            texts.append(part["text"])
        return _text("".join(texts), f"{where}.content")
    raise invalid(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [_text(value, "stop")]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_text(v, "stop") for v in value]
    raise invalid("stop must be a string or a list of strings", param="stop")


def _number(body: dict[str, object], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"{name} must be a number", param=name)
    return float(value)


def _uint(body: dict[str, object], name: str, largest: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= largest:
        raise invalid(f"{name} must be a whole number from 0 to {largest}", param=name)
    return value


def _bool(body: dict[str, object], name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{param or name} must be true or false", param=param or name)
    return value


def _text(value: str, param: str) -> str:
    """``value``, if it is Unicode text: JSON's escapes (and a header's bytes) can carry lone surrogates,
    half a character that a client cut in two, which no protocol further on can carry."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise invalid(f"{param} is not valid Unicode text (a lone surrogate: half a character)", param) from None
    return value


def _default(value: object, defaults: tuple[object, ...]) -> bool:
    """Whether ``value`` is one of ``defaults``, of the same type too (``true`` is no ``1`` here)."""
    return any(type(value) is type(default) and value == default for default in defaults)


def _name(field: str) -> str:
    return bounded(field, 64)


def _names(fields: list[str]) -> str:
    """At most five names, each cut short: the caller chose them."""
    shown = ", ".join(_name(f) for f in fields[:5])
    return shown + (f" and {len(fields) - 5} more" if len(fields) > 5 else "")
