"""Validating a ``Generate`` request into what the engine runs.

Every problem is collected and reported at once as INVALID_ARGUMENT, each
naming its field, so a caller can fix a request in one round trip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from sluice.common.v1 import common_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core.errors import FieldViolation, InvalidArgument
from sluice_core.messages import MAX_MESSAGES, TEMPLATE_CHARS_PER_MESSAGE, validate_messages
from sluice_core.sampling import Sampling, validate_sampling
from sluice_inference.prompts import ChatTemplateError

MAX_REQUEST_ID_LEN = 128
ENGINE_PRIORITIES = (0, 1)
# Long inputs are counted in pieces of this many characters.
_PIECE_CHARS = 4096
_PIECE_SLACK_TOKENS = 4


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    priority: int
    history_dropped: int = 0


class PromptTokenizer(Protocol):
    """Turns the request's input into token ids (see ``prompts.py``)."""

    # The most characters one token stands for (its vocabulary's longest entry).
    longest_token_chars: int

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        """Raises ``ChatTemplateError`` when the model's chat template refuses the messages."""
        ...


def validate(
    request: inference_pb2.GenerateRequest, tokenizer: PromptTokenizer, *, max_model_len: int, vocab_size: int
) -> ValidRequest:
    """Check a request against the model's limits; raise ``InvalidArgument`` naming every bad field."""
    violations: list[FieldViolation] = []
    request_id = request.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_LEN:
        violations.append(FieldViolation("request_id", f"at most {MAX_REQUEST_ID_LEN} characters"))
    if request.priority not in ENGINE_PRIORITIES:
        # The queue's classes: a caller reaching a replica otherwise must not run ahead of everyone.
        violations.append(FieldViolation("priority", "must be 0 (interactive) or 1 (batch)"))
    # Sampling first (max_tokens decides how much history fits), but reported after the prompt.
    sampling_violations: list[FieldViolation] = []
    sampling = validate_sampling(request.sampling, sampling_violations) if request.HasField("sampling") else None
    if sampling is None:
        sampling_violations.append(FieldViolation("sampling.max_tokens", "required, at least 1"))
    if sampling is not None and sampling.top_k > vocab_size:
        sampling_violations.append(
            FieldViolation("sampling.top_k", f"must be at most the model's vocabulary, {vocab_size} (0 is off)")
        )
    room = max_model_len - max(1, sampling.max_tokens if sampling is not None else 1)
    if _cannot_fit(request, tokenizer, max_model_len):
        # Refused before tokenizing it all: megabytes of text take seconds to tokenize.
        violations.append(
            FieldViolation(_input_field(request), f"far longer than the model's context of {max_model_len} tokens")
        )
        prompt, dropped = None, 0
    else:
        prompt, dropped = _prompt_token_ids(request, tokenizer, vocab_size, room, violations)
    violations += sampling_violations
    if prompt is not None:
        if len(prompt) >= max_model_len:
            violations.append(
                FieldViolation(
                    _input_field(request),
                    f"the prompt is {len(prompt)} tokens; the model's context is {max_model_len} tokens, "
                    "so the prompt must be shorter to leave room for at least one generated token",
                )
            )
        elif sampling is not None and sampling.max_tokens > 0 and len(prompt) + sampling.max_tokens > max_model_len:
            violations.append(
                FieldViolation(
                    "sampling.max_tokens",
                    f"{sampling.max_tokens} does not fit: the prompt is {len(prompt)} tokens and the model's "
                    f"context is {max_model_len}, so at most {max_model_len - len(prompt)}",
                )
            )
    if violations:
        raise InvalidArgument(violations)
    assert prompt is not None and sampling is not None
    return ValidRequest(request_id, prompt, sampling, request.priority, dropped)


def _input_field(request: inference_pb2.GenerateRequest) -> str:
    return request.WhichOneof("input") or "prompt"


def _cannot_fit(request: inference_pb2.GenerateRequest, tokenizer: PromptTokenizer, max_model_len: int) -> bool:
    """Whether the input is too long to fit the context, found with bounded work whatever its size.

    Only what cannot be dropped counts: the prompt, or the messages after the
    history. No token stands for more characters than the vocabulary's
    longest entry; twice that per token of context allows for normalizers
    that shrink text. Text within that may fit, and is tokenized as it is;
    text past twice that cannot, whatever it holds. In between, it is
    counted piece by piece, and the count stops as soon as it shows the
    text cannot fit: at most about a context's worth of tokens is made (a
    15 MB prompt of ideographic spaces took 57 s to tokenize in full, and
    held up every long input behind it).
    """
    match request.WhichOneof("input"):
        case "prompt":
            texts = [request.prompt]
        case "messages":
            texts = [m.content for m in request.messages.messages[request.history_messages :]]
        case _:
            return False
    chars = sum(map(len, texts)) + (TEMPLATE_CHARS_PER_MESSAGE * len(texts) if request.HasField("messages") else 0)
    most = 2 * max_model_len * tokenizer.longest_token_chars
    if chars <= most:
        return False
    if chars > 2 * most:
        return True
    counted = 0
    for text in texts:
        for piece in _pieces(text, _PIECE_CHARS):
            # Less what a cut may have split or added (a special token, a merge across the cut).
            counted += max(0, len(tokenizer.encode(piece)) - _PIECE_SLACK_TOKENS)
            if counted > max_model_len:
                return True
    return False


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, cut at a space or line end where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def _prompt_token_ids(
    request: inference_pb2.GenerateRequest,
    tokenizer: PromptTokenizer,
    vocab_size: int,
    room: int,
    out: list[FieldViolation],
) -> tuple[list[int] | None, int]:
    """The prompt's token ids and how many history messages were dropped to fit ``room`` tokens."""
    match request.WhichOneof("input"):
        case "prompt":
            if not request.prompt.strip():
                out.append(FieldViolation("prompt", "must not be empty"))
                return None, 0
            return tokenizer.encode(request.prompt), 0
        case "messages":
            messages = list(request.messages.messages)
            # The history the queue adds (at most its own cap) comes on top of the caller's messages.
            if not validate_messages(messages, out, most=2 * MAX_MESSAGES):
                return None, 0
            if request.history_messages > len(messages):
                out.append(FieldViolation("history_messages", "more than there are messages"))
                return None, 0
            return _fit_history(messages, request.history_messages, tokenizer, room, out)
        case "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
            if not ids:
                out.append(FieldViolation("prompt_token_ids", "must not be empty"))
                return None, 0
            if max(ids) >= vocab_size:
                out.append(
                    FieldViolation("prompt_token_ids", f"token ids must be below the vocabulary size {vocab_size}")
                )
                return None, 0
            return ids, 0
        case _:
            out.append(FieldViolation("prompt", "one of prompt, messages or prompt_token_ids is required"))
            return None, 0


def _fit_history(
    messages: list[common_pb2.ChatMessage],
    history: int,
    tokenizer: PromptTokenizer,
    room: int,
    out: list[FieldViolation],
) -> tuple[list[int] | None, int]:
    """Drop the oldest history messages (keeping a leading system message) until the prompt fits ``room``.

    History is cut only before one of its user messages (or as a whole), so
    that what is left alternates as chat templates expect; a history that
    starts with an answer (the stored window begins mid-turn) loses that
    answer, whose question is gone anyway. The prompt only shrinks as more is
    cut: a binary search renders it O(log n) times, not once per message
    (hundreds of turns took seconds).
    """
    keep_first = 1 if history > 0 and messages[0].role == common_pb2.ROLE_SYSTEM else 0
    droppable = history - keep_first
    user = common_pb2.ROLE_USER
    cuts = [d for d in range(droppable) if messages[keep_first + d].role == user] + [droppable]
    encoded: dict[int, list[int]] = {}

    def prompt(dropped: int) -> list[int]:
        if dropped not in encoded:
            encoded[dropped] = tokenizer.encode_chat(messages[:keep_first] + messages[keep_first + dropped :])
        return encoded[dropped]

    try:
        # The first cut that fits (the last one if none does).
        low, high = 0, len(cuts) - 1
        while low < high:
            middle = low if low == 0 else (low + high) // 2  # no cut first: the usual case
            if len(prompt(cuts[middle])) <= room:
                high = middle
            else:
                low = middle + 1
        return prompt(cuts[low]), cuts[low]
    except ChatTemplateError as exc:
        out.append(FieldViolation("messages", f"the model's chat template refuses them: {exc}"))
        return None, 0
