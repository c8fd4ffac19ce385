"""Public request checks and the translation to the internal request."""

from __future__ import annotations

import uuid

import pytest

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_core.errors import FieldViolation, InvalidArgument
from sluice_queue.requests import in_public_terms, new_messages, to_inference, with_history


def public(**fields: object) -> generation_pb2.GenerateRequest:
    base: dict[str, object] = {"prompt": "hello", "sampling": common_pb2.SamplingParams(max_tokens=4)}
    return generation_pb2.GenerateRequest(**{**base, **fields})  # type: ignore[arg-type]


def test_prompt_and_sampling_pass_through_with_the_request_id() -> None:
    internal = to_inference(public(priority=generation_pb2.PRIORITY_BATCH), "rid")
    assert (internal.prompt, internal.request_id, internal.sampling.max_tokens) == ("hello", "rid", 4)
    assert internal.priority == 1  # batch runs after interactive in the engine


def test_chat_messages_pass_through() -> None:
    messages = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")])
    internal = to_inference(
        generation_pb2.GenerateRequest(messages=messages, sampling=common_pb2.SamplingParams(max_tokens=1)), "r"
    )
    assert internal.messages == messages


def chat(*turns: tuple[common_pb2.Role.ValueType, str]) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in turns])


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (public(prompt=" "), ["prompt"]),
        (generation_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=1)), ["prompt"]),
        (
            public(sampling=common_pb2.SamplingParams(max_tokens=0, temperature=-1)),
            ["sampling.max_tokens", "sampling.temperature"],
        ),
        (generation_pb2.GenerateRequest(prompt="x"), ["sampling.max_tokens"]),
        (public(client_request_id="x" * 129), ["client_request_id"]),
        (public(priority=7), ["priority"]),
        (public(prompt=None, messages=common_pb2.ChatMessages()), ["messages"]),
        (public(prompt=None, messages=chat((common_pb2.Role.ValueType(9), "hi"))), ["messages.messages[0].role"]),
        (public(prompt=None, messages=chat((common_pb2.ROLE_USER, " "))), ["messages"]),
        (public(sampling=common_pb2.SamplingParams(max_tokens=1, stop=["x" * 257])), ["sampling.stop"]),
        # 400,000 empty messages held a replica's other streams for 4 s.
        (public(prompt=None, messages=chat(*[(common_pb2.ROLE_USER, "")] * 4097)), ["messages"]),
        # A turn of a conversation that could not be stored was generated, then silently dropped.
        (
            public(prompt=None, conversation_id=str(uuid.uuid4()), messages=chat(*[(common_pb2.ROLE_USER, "x")] * 256)),
            ["messages"],
        ),
    ],
)
def test_bad_input_is_rejected_before_queueing(request_: generation_pb2.GenerateRequest, fields: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        to_inference(request_, "r")
    assert [v.field for v in caught.value.violations] == fields


def test_history_goes_before_the_new_turn() -> None:
    history = [
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="earlier"),
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="reply"),
    ]
    request = public(prompt="now")
    internal = to_inference(request, "r")
    with_history(internal, history, new_messages(request))
    assert [m.content for m in internal.messages.messages] == ["earlier", "reply", "now"]
    assert internal.messages.messages[2].role == common_pb2.ROLE_USER
    assert internal.history_messages == 2


def test_inference_complaints_about_a_conversation_name_the_callers_fields() -> None:
    complaints = InvalidArgument(
        [
            FieldViolation("messages", "the prompt is 3000 tokens"),
            FieldViolation("messages.messages[1].content", "a stored message"),
            FieldViolation("messages.messages[3].content", "too long"),
            FieldViolation("sampling.max_tokens", "does not fit"),
        ]
    )
    with_prompt = in_public_terms(complaints, public(conversation_id="c"), history=2)
    assert [v.field for v in with_prompt.violations] == ["prompt", "conversation_id", "prompt", "sampling.max_tokens"]
    with_messages = in_public_terms(complaints, public(prompt=None, messages=chat((common_pb2.ROLE_USER, "hi"))), 2)
    assert [v.field for v in with_messages.violations] == [
        "messages",
        "conversation_id",
        "messages.messages[1].content",
        "sampling.max_tokens",
    ]
