"""Checking a public ``Generate`` request and turning it into the internal one.

What needs the model (prompt length, the context it leaves for max_tokens)
is checked by inference; its INVALID_ARGUMENT reaches the caller unchanged,
with the same field names.
"""

from __future__ import annotations

import re

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core.errors import FieldViolation, InvalidArgument
from sluice_core.ids import MALFORMED, canonical_id
from sluice_core.messages import validate_messages
from sluice_core.sampling import validate_sampling

MAX_CLIENT_REQUEST_ID_LEN = 128
# The data-access service appends at most 256 messages at once: a turn's and the reply.
MAX_TURN_MESSAGES = 255
_MESSAGE_FIELD = re.compile(r"messages\.messages\[(\d+)\](.*)")

# The engine runs lower priority values first.
ENGINE_PRIORITY = {
    generation_pb2.PRIORITY_UNSPECIFIED: 0,
    generation_pb2.PRIORITY_INTERACTIVE: 0,
    generation_pb2.PRIORITY_BATCH: 1,
}


def to_inference(request: generation_pb2.GenerateRequest, request_id: str) -> inference_pb2.GenerateRequest:
    violations: list[FieldViolation] = []
    match request.WhichOneof("input"):
        case "prompt" if not request.prompt.strip():
            violations.append(FieldViolation("prompt", "must not be empty"))
        case "messages":
            validate_messages(request.messages.messages, violations)
        case None:
            violations.append(FieldViolation("prompt", "one of prompt or messages is required"))
    if request.HasField("sampling"):
        validate_sampling(request.sampling, violations)
    else:
        violations.append(FieldViolation("sampling.max_tokens", "required, at least 1"))
    if request.priority not in ENGINE_PRIORITY:
        violations.append(FieldViolation("priority", f"unknown priority {request.priority}"))
    if request.conversation_id and canonical_id(request.conversation_id) is None:
        violations.append(FieldViolation("conversation_id", MALFORMED))
    if request.conversation_id and len(request.messages.messages) > MAX_TURN_MESSAGES:
        # Generated, then silently not stored, it was: the exchange did not fit one append.
        violations.append(
            FieldViolation("messages", f"at most {MAX_TURN_MESSAGES} messages in a turn of a conversation")
        )
    if len(request.client_request_id) > MAX_CLIENT_REQUEST_ID_LEN:
        violations.append(FieldViolation("client_request_id", f"at most {MAX_CLIENT_REQUEST_ID_LEN} characters"))
    if violations:
        raise InvalidArgument(violations)
    internal = inference_pb2.GenerateRequest(
        request_id=request_id, sampling=request.sampling, priority=ENGINE_PRIORITY[request.priority]
    )
    if request.WhichOneof("input") == "prompt":
        internal.prompt = request.prompt
    else:
        internal.messages.CopyFrom(request.messages)
    return internal


def new_messages(request: generation_pb2.GenerateRequest) -> list[common_pb2.ChatMessage]:
    """What this request adds to a conversation: its messages, or its prompt as the user's turn."""
    if request.WhichOneof("input") == "prompt":
        return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=request.prompt)]
    return list(request.messages.messages)


def with_history(internal: inference_pb2.GenerateRequest, history: list[common_pb2.ChatMessage],
                 new: list[common_pb2.ChatMessage]) -> None:  # fmt: skip
    """Turn the internal request into chat messages: the conversation's turns, then this request's."""
    internal.messages.CopyFrom(common_pb2.ChatMessages(messages=[*history, *new]))
    internal.history_messages = len(history)


def in_public_terms(error: InvalidArgument, request: generation_pb2.GenerateRequest, history: int) -> InvalidArgument:
    """Inference's complaints about a request sent with its conversation's history, in the caller's field names.

    Inference sees the history and this request's turn as one list of messages;
    the caller sent a prompt, or messages counted from its own first one.
    """
    own = request.WhichOneof("input") or "prompt"
    renamed = []
    for violation in error.violations:
        field = violation.field
        if field == "messages":
            field = own
        elif (found := _MESSAGE_FIELD.fullmatch(field)) is not None:
            index = int(found[1]) - history
            if index < 0:
                field = "conversation_id"  # a stored message
            elif own == "messages":
                field = f"messages.messages[{index}]{found[2]}"
            else:
                field = own
        renamed.append(FieldViolation(field, violation.description))
    return InvalidArgument(renamed)
