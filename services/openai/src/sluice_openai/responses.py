"""OpenAI's response shapes, for one request: the whole answer, or its stream of chunks as SSE events.

Streams follow OpenAI's format: one ``data: {json}`` event per chunk, the
role on the first chat chunk, ``finish_reason`` on the last, with
``stream_options.include_usage`` a ``usage`` of null on every chunk and one
more chunk (no choices) carrying the request's usage, then ``data: [DONE]``.
Comment lines (``: queued position=3``) tell a waiting client its place in
the queue; OpenAI's clients skip them.
"""

from __future__ import annotations

import json
import time

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_openai.requests import Call

DONE = b"data: [DONE]\n\n"
# Before the first event after the queue positions: an empty comment line. Some clients
# (vLLM's benchmark among them) strip each network read and split what they have on blank
# lines, so a comment that arrives alone sticks to the front of the next event, which is
# then lost; this ends it first. Parsers that follow the SSE spec skip it.
AFTER_COMMENTS = b":\n\n"
_FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    # vLLM's word for a request that ended before its time (here: its replica was lost mid-answer).
    common_pb2.FINISH_REASON_ABORT: "abort",
}
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def event(payload: dict[str, object]) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + _encoder.encode(payload).encode() + b"\n\n"


def queued(position: int) -> bytes:
    return f": queued position={position}\n\n".encode()


def usage(finished: generation_pb2.Finished) -> dict[str, object]:
    counts = finished.usage
    answer: dict[str, object] = {
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "total_tokens": counts.prompt_tokens + counts.completion_tokens,
    }
    if counts.cached_tokens:
        answer["prompt_tokens_details"] = {"cached_tokens": counts.cached_tokens}
    return answer


def finish_reason(finished: generation_pb2.Finished) -> str | None:
    return _FINISH_REASONS.get(finished.reason)


class Answer:
    """The objects of one request's answer, which share its id, creation time and model."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._created = int(time.time())
        self._id = ""
        self._model = call.model
        self._object = "chat.completion" if call.kind == "chat" else "text_completion"
        self._chunk_object = "chat.completion.chunk" if call.kind == "chat" else "text_completion"
        self._role_sent = False
        self._frame_chunks()

    def started(self, started: generation_pb2.Started) -> None:
        prefix = "chatcmpl-" if self._call.kind == "chat" else "cmpl-"
        self._id = prefix + started.request_id
        self._model = started.model
        self._frame_chunks()

    def _frame_chunks(self) -> None:
        # Every chunk of a stream shares its head (id, object, created, model) and its end: encoded
        # once here, not once per chunk, which is once per token message.
        head = _encoder.encode(self._head(self._chunk_object))
        self._chunk_start = b"data: " + head[:-1].encode() + b',"choices":['
        self._chunk_end = (b'],"usage":null}' if self._call.include_usage else b"]}") + b"\n\n"

    def _head(self, object_name: str) -> dict[str, object]:
        return {"id": self._id, "object": object_name, "created": self._created, "model": self._model}

    def _chunk(self, choice: dict[str, object], finish_reason: str | None = None) -> bytes:
        """One chunk's SSE event."""
        body = {"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk_start + _encoder.encode(body).encode() + self._chunk_end

    def text_chunk(self, text: str) -> bytes:
        """A chunk of new text (after the role chunk, for the first of a chat's)."""
        if self._call.kind != "chat":
            return self._chunk({"text": text})
        head = b""
        if not self._role_sent:
            self._role_sent = True
            head = self._chunk({"delta": {"role": "assistant", "content": ""}})
        return head + self._chunk({"delta": {"content": text}})

    def last_chunks(self, finished: generation_pb2.Finished) -> bytes:
        """The chunk with the finish reason, the usage chunk if asked for, and ``[DONE]``."""
        empty: dict[str, object] = {"delta": {}} if self._call.kind == "chat" else {"text": ""}
        answer = self._chunk(empty, finish_reason(finished))
        if self._call.include_usage:
            answer += event({**self._head(self._chunk_object), "choices": [], "usage": usage(finished)})
        return answer + DONE

    def whole(self, text: str, finished: generation_pb2.Finished) -> dict[str, object]:
        """The answer of a request that did not ask to stream."""
        if self._call.kind == "chat":
            choice: dict[str, object] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish_reason(finished)}
        return {**self._head(self._object), "choices": [choice], "usage": usage(finished)}
