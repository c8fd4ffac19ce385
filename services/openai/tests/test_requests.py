"""OpenAI request bodies into Generation requests: mapped one to one, or refused naming the field."""

from __future__ import annotations

import pytest

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_openai.errors import OpenAIError
from sluice_openai.requests import parse


def refused(kind: str, body: object, headers: dict[str, str] | None = None) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse(kind, body, headers or {}, 512)  # type: ignore[arg-type]
    assert caught.value.status == 400
    return caught.value


def test_sampling_fields_map_one_to_one_with_vllms_extensions() -> None:
    body = {
        "model": "m", "prompt": "The river", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": -1,
        "min_p": 0.1, "presence_penalty": 0.2, "frequency_penalty": 0.3, "repetition_penalty": 1.1, "seed": 42,
        "stop": "\n", "ignore_eos": True, "min_tokens": 3, "logprobs": None, "n": 1, "user": "someone",
    }  # fmt: skip
    call = parse("completion", body, {}, 512)
    assert call.model == "m" and not call.stream
    assert call.request.prompt == "The river"
    sampling = call.request.sampling
    assert (sampling.max_tokens, sampling.top_k, sampling.seed, sampling.min_tokens) == (7, 0, 42, 3)
    assert sampling.temperature == pytest.approx(0.5) and sampling.repetition_penalty == pytest.approx(1.1)
    assert list(sampling.stop) == ["\n"] and sampling.ignore_eos


def test_chat_messages_take_text_parts_and_the_developer_role() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        ],
        "max_completion_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = parse("chat", body, {"x-sluice-conversation": "c", "x-client-request-id": "r"}, 512)
    assert [(m.role, m.content) for m in call.request.messages.messages] == [
        (common_pb2.ROLE_SYSTEM, "Be brief."),
        (common_pb2.ROLE_USER, "Hello"),
    ]
    assert call.request.sampling.max_tokens == 9
    assert call.stream and call.include_usage
    assert (call.request.conversation_id, call.request.client_request_id) == ("c", "r")


def test_a_request_without_max_tokens_gets_the_default() -> None:
    assert parse("chat", {"messages": [{"role": "user", "content": "hi"}]}, {}, 512).request.sampling.max_tokens == 512


@pytest.mark.parametrize(
    ("headers", "body", "priority"),
    [
        ({}, {}, generation_pb2.PRIORITY_UNSPECIFIED),
        ({"x-sluice-priority": "batch"}, {}, generation_pb2.PRIORITY_BATCH),
        ({}, {"priority": 5}, generation_pb2.PRIORITY_BATCH),
        ({}, {"priority": -1}, generation_pb2.PRIORITY_INTERACTIVE),
        ({"x-sluice-priority": "Interactive"}, {"priority": 5}, generation_pb2.PRIORITY_INTERACTIVE),
    ],
)
def test_priority_comes_from_the_header_or_vllms_field(
    headers: dict[str, str], body: dict[str, object], priority: int
) -> None:
    assert parse("completion", {"prompt": "x", **body}, headers, 512).request.priority == priority


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 2), ("logprobs", 1), ("echo", True), ("tools", [{"type": "function"}]), ("best_of", 3),
     ("response_format", {"type": "json_object"}), ("logit_bias", {"1": 5})],
)  # fmt: skip
def test_what_sluice_cannot_honour_is_refused_naming_it(field: str, value: object) -> None:
    error = refused("completion", {"prompt": "x", field: value})
    assert error.param == field and field in error.message


def test_unknown_fields_are_refused_and_the_list_is_bounded() -> None:
    body = {"prompt": "x", **{f"field{i}" + "z" * 1000: 1 for i in range(40)}}
    error = refused("completion", body)
    assert "and 35 more" in error.message
    assert len(error.message.encode()) < 600


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"prompt": ["a", "b"]},
        {"prompt": [1, 2, 3]},
        {"prompt": 5},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 2**40},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "temperature": "hot"},
        {"prompt": "x", "temperature": float("nan")},
        {"prompt": "x", "stop": [1]},
        {"prompt": "x", "stream": "yes"},
        {"prompt": "x", "stream_options": {"include_usage": True}},
        {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}},
        {"prompt": "x", "priority": "high"},
        {"prompt": "x", "model": 3},
    ],
)
def test_malformed_completion_bodies_are_400(body: object) -> None:
    refused("completion", body)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [{"role": "tool", "content": "x"}],
        [{"role": "r" * 10_000, "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "x", "tool_calls": []}],
        [{"role": "user", "content": None}],
    ],
)
def test_malformed_chat_messages_are_400_and_bounded(messages: object) -> None:
    error = refused("chat", {"messages": messages})
    assert len(error.message.encode()) < 300


def test_max_tokens_and_max_completion_tokens_must_agree() -> None:
    messages = [{"role": "user", "content": "hi"}]
    refused("chat", {"messages": messages, "max_tokens": 3, "max_completion_tokens": 4})
    agreeing = {"messages": messages, "max_tokens": 3, "max_completion_tokens": 3}
    assert parse("chat", agreeing, {}, 9).request.sampling.max_tokens == 3


def test_an_unknown_priority_header_is_400() -> None:
    refused("completion", {"prompt": "x"}, {"x-sluice-priority": "urgent"})


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("completion", {"prompt": "half a \ud83d character"}, "prompt"),
        ("completion", {"prompt": "x", "stop": ["\udc00"]}, "stop"),
        ("completion", {"prompt": "x", "model": "m\ud800"}, "model"),
        ("chat", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "messages[0].content"),
        ("chat", {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0]"),
        ("chat", {"messages": [{"role": "\ud800", "content": "x"}]}, "messages[0]"),
        ("chat", {"messages": [{"role": "user", "content": "x", "name": {}}]}, "messages[0].name"),
        ("completion", {"prompt": "x", "n": True}, "n"),
        ("completion", {"prompt": "x", "logprobs": 0.0}, "logprobs"),
        ("completion", {"prompt": "x", "model": 0}, "model"),
        ("completion", {"prompt": "x", "seed": 2**63}, "seed"),
        ("completion", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
         "stream_options.include_usage"),
    ],
)  # fmt: skip
def test_text_that_is_no_unicode_and_values_of_the_wrong_type_are_400_naming_the_field(
    kind: str, body: object, param: str
) -> None:
    assert refused(kind, body).param == param


def test_a_header_that_is_no_unicode_is_400() -> None:
    assert (
        refused("completion", {"prompt": "x"}, {"x-sluice-conversation": "\udcff\udcfe"}).param
        == "x-sluice-conversation"
    )
