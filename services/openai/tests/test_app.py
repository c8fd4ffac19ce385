"""The front's HTTP answers for given Generation events: the exact SSE bytes, whole answers, errors.

The Generation API is a fake here (a boundary in a unit test); tests/test_openai.py
drives the real one through Envoy with OpenAI's SDK.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_core import errors
from sluice_openai.app import Front
from sluice_openai.settings import OpenAISettings

Event = generation_pb2.GenerateEvent


def rpc_error(error: errors.SluiceError) -> grpc.aio.AioRpcError:
    status = errors.to_status(error)
    return grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
    )


class FakeCall:
    def __init__(self, events: Sequence[Event], error: grpc.aio.AioRpcError | None) -> None:
        self._events = events
        self._error = error
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        for event in self._events:
            yield event
        if self._error is not None:
            raise self._error

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeGeneration:
    """The Generation API answering every call with the same events (then ``error``, if given)."""

    def __init__(self, events: Sequence[Event] = (), error: grpc.aio.AioRpcError | None = None) -> None:
        self.events = events
        self.error = error
        self.calls: list[tuple[generation_pb2.GenerateRequest, Any, float | None]] = []

    def Generate(self, request: generation_pb2.GenerateRequest, *, metadata: Any, timeout: float | None) -> FakeCall:
        self.calls.append((request, metadata, timeout))
        return FakeCall(self.events, self.error)

    async def ListModels(self, request: Any, **_: Any) -> generation_pb2.ListModelsResponse:
        return generation_pb2.ListModelsResponse(models=[generation_pb2.Model(id="sluice-tiny", max_model_len=64)])


def answer(*deltas: str, reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_LENGTH) -> list[Event]:
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=len(deltas))
    return [
        Event(queued=generation_pb2.Queued(position=1)),
        Event(started=generation_pb2.Started(request_id="r1", model="sluice-tiny", prompt_tokens=3)),
        *(Event(delta=common_pb2.TokenDelta(text=text)) for text in deltas),
        Event(finished=generation_pb2.Finished(reason=reason, usage=usage)),
    ]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    yield


async def served(
    generation: FakeGeneration, callers: frozenset[str] | None = None, max_body_bytes: int = 4096
) -> TestClient[Any, Any]:
    front = Front(generation, OpenAISettings(max_body_bytes=max_body_bytes))  # type: ignore[arg-type]
    client: TestClient[Any, Any] = TestClient(TestServer(front.app(callers)))
    await client.start_server()
    return client


CHAT = {"model": "sluice-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

GOLDEN_CHAT_STREAM = (
    b": queued position=1\n\n"
    b":\n\n"
    b'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[{"index":0,"delta":{"content":"l\xc3\xb6"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}\n\n'
    b"data: [DONE]\n\n"
)


async def test_a_chat_stream_is_exactly_openais_bytes() -> None:
    client = await served(FakeGeneration(answer("Hel", "", "lö")))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert await response.read() == GOLDEN_CHAT_STREAM
    await client.close()


GOLDEN_COMPLETION_STREAM = (
    b": queued position=1\n\n"
    b":\n\n"
    b'data: {"id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[{"index":0,"text":"A","logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"cmpl-r1","object":"text_completion","created":1700000000,"model":"sluice-tiny",'
    b'"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


async def test_a_completion_stream_without_usage_is_exactly_openais_bytes() -> None:
    client = await served(FakeGeneration(answer("A", reason=common_pb2.FINISH_REASON_STOP)))
    response = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert await response.read() == GOLDEN_COMPLETION_STREAM
    await client.close()


async def test_vllms_benchmark_client_reads_every_event_when_each_write_arrives_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # vllm bench serve strips each network read and splits on blank lines: a position comment
    # read on its own used to stick to the next event, which it then never parsed.
    writes: list[bytes] = []
    write = web.StreamResponse.write

    async def recorded(self: web.StreamResponse, data: bytes) -> None:
        writes.append(bytes(data))
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", recorded)
    client = await served(FakeGeneration(answer("Hel", "lo")))
    body = await (await client.post("/v1/completions", json={"prompt": "x", "stream": True})).read()
    await client.close()
    handler = StreamedResponseHandler()
    read = [m for data in writes for m in handler.add_chunk(data.strip()) if not m.startswith(":")]
    assert read == [e for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert len(read) == 4  # two chunks of text, the finish, [DONE]


async def test_a_whole_chat_answer_has_the_message_and_usage() -> None:
    generation = FakeGeneration(answer("Hel", "lo"))
    client = await served(generation)
    response = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k1", "x-sluice-timeout": "2.5"}
    )
    assert await response.json() == {
        "id": "chatcmpl-r1", "object": "chat.completion", "created": 1700000000, "model": "sluice-tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }  # fmt: skip
    ((_, metadata, timeout),) = generation.calls
    assert (metadata, timeout) == ((("x-api-key", "k1"),), 2.5)
    await client.close()


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (errors.InvalidArgument.field("sampling.max_tokens", "too many"), 400, None),
        (errors.Unauthenticated("unknown or revoked API key"), 401, None),
        (errors.NotFound("no such conversation"), 404, None),
        (errors.ResourceExhausted("over the token budget", retry_after_s=2.5), 429, "3"),
        (errors.Unavailable("no replica"), 503, None),
        (errors.DeadlineExceeded("deadline"), 504, None),
    ],
)
async def test_a_refusal_before_any_event_has_its_http_status(
    error: errors.SluiceError, status: int, retry_after: str | None
) -> None:
    client = await served(FakeGeneration(error=rpc_error(error)))
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status == status
    assert response.headers.get("Retry-After") == retry_after
    body = await response.json()
    assert body["error"]["message"] == error.message
    if status == 400:
        assert body["error"]["param"] == "max_tokens"
    await client.close()


async def test_an_error_mid_stream_is_the_last_event() -> None:
    generation = FakeGeneration(answer("Hel")[:3], error=rpc_error(errors.Unavailable("the replica was lost")))
    client = await served(generation)
    response = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    events = (await response.read()).split(b"\n\n")
    assert events[-3:] == [b'data: {"error":{"message":"the replica was lost","type":"service_unavailable_error",'
                           b'"param":null,"code":"unavailable"}}', b"data: [DONE]", b""]  # fmt: skip
    await client.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"x" * 5000, 413),
        ("POST", "/v1/embeddings", b"{}", 404),
        ("GET", "/v1/completions", b"", 405),
        ("POST", "/v1/completions", b'{"prompt": "x", "model": "other"}', 404),
        ("POST", "/v1/completions", b'{"prompt": "x"}', 200),
    ],
)
async def test_bad_requests_get_openais_error_json(method: str, path: str, body: bytes, status: int) -> None:
    client = await served(FakeGeneration(answer("A")))
    response = await client.request(method, path, data=body)
    assert response.status == status
    if status != 200:
        assert set(json.loads(await response.read())["error"]) == {"message", "type", "param", "code"}
    await client.close()


async def test_with_tls_a_caller_without_envoys_certificate_is_refused() -> None:
    client = await served(FakeGeneration(answer("A")), callers=frozenset({"spiffe://sluice.local/envoy"}))
    response = await client.get("/v1/models")
    assert response.status == 403
    await client.close()


async def test_health_says_draining_once_stopping() -> None:
    front = Front(FakeGeneration(), OpenAISettings())  # type: ignore[arg-type]
    client: TestClient[Any, Any] = TestClient(TestServer(front.app(None)))
    await client.start_server()
    assert (await client.get("/health")).status == 503
    front.serving = True
    assert (await client.get("/health")).status == 200
    await client.close()


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"[" * 2000 + b"]" * 2000, {}, 400),  # nested deeper than the parser recurses
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", {}, 400),  # past the 4,300 digits Python parses
        (b'{"prompt": "x"}', {"Content-Encoding": "gzip"}, 400),
        (b'{"prompt": "x"}', {"x-api-key": "sk-\u00e9".encode().decode("latin-1")}, 401),
    ],
)
async def test_bodies_and_keys_no_parser_expects_are_openai_errors_not_500s(
    body: bytes, headers: dict[str, str], status: int
) -> None:
    client = await served(FakeGeneration(answer("A")), max_body_bytes=65536)
    response = await client.post("/v1/completions", data=body, headers=headers)
    assert response.status == status
    assert "error" in json.loads(await response.read())
    await client.close()
