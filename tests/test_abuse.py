"""Hostile and buggy callers against the whole stack through Envoy: each gets a bounded answer with the
documented status, and well-behaved streams on the same replicas are unaffected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from sluice.common.v1 import generation_pb2 as common_pb2
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_cli.stack import LocalStack
from sluice_client import GenerationClient, StreamError

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# What an error may weigh, message and details together: well under gRPC's 8 KB metadata limit.
MAX_ERROR_CHARS = 2048


def sampling(max_tokens: int = 8) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)


class Bystanders:
    """Well-behaved streams running while a hostile call is made."""

    def __init__(self, client: GenerationClient, n: int = 6, max_tokens: int = 200) -> None:
        self._client = client
        self._request = generation_pb2.GenerateRequest(prompt="The river", sampling=sampling(max_tokens))
        self.max_tokens = max_tokens
        self.flowing = [asyncio.Event() for _ in range(n)]
        self.tasks = [asyncio.create_task(self._run(flowing)) for flowing in self.flowing]

    async def _run(self, flowing: asyncio.Event) -> int:
        tokens = 0
        async for event in self._client.generate(self._request, timeout=60):
            tokens += len(event.delta.token_ids)
            flowing.set()
        return tokens

    async def unaffected(self) -> None:
        """Every stream got all its tokens (one cut off raises its StreamError here)."""
        assert await asyncio.gather(*self.tasks) == [self.max_tokens] * len(self.tasks)


@pytest.fixture
async def bystanders(stack: LocalStack) -> AsyncIterator[Bystanders]:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        running = Bystanders(client)
        await asyncio.gather(*(flowing.wait() for flowing in running.flowing))
        yield running


async def refusal(stack: LocalStack, request: generation_pb2.GenerateRequest) -> StreamError:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        with pytest.raises(StreamError) as caught:
            async for _ in client.generate(request, timeout=30):
                pass
    return caught.value


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(
            generation_pb2.GenerateRequest(
                messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(content="x")] * 500),
                sampling=sampling(),
            ),
            id="500 field violations",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(prompt="hi", conversation_id="c" * 40_000, sampling=sampling()),
            id="a 40,000-character conversation id",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(prompt="hi", conversation_id="会" * 4_000, sampling=sampling()),
            id="a conversation id that percent-encodes to 36 KB",
        ),
    ],
)
async def test_an_error_about_huge_input_is_bounded_and_other_callers_streams_go_on(
    stack: LocalStack, bystanders: Bystanders, request_: generation_pb2.GenerateRequest
) -> None:
    refused = await refusal(stack, request_)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
    violations = getattr(refused.error, "violations", ())
    assert len(str(refused)) + sum(len(v.field) + len(v.description) for v in violations) < MAX_ERROR_CHARS
    await bystanders.unaffected()


async def test_bytes_that_are_no_request_are_invalid_argument_and_other_callers_streams_go_on(
    stack: LocalStack, bystanders: Bystanders
) -> None:
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        generate: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/sluice.generation.v1.Generation/Generate"
        )
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 100):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in generate(garbage, metadata=(("x-api-key", stack.demo_api_key),), timeout=10):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert "not a valid sluice.generation.v1.GenerateRequest" in (caught.value.details() or "")
    await bystanders.unaffected()


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(("x-api-key", "x-api-key"), id="two x-api-key headers"),
        pytest.param(("x-api-key", "authorization"), id="x-api-key and authorization Bearer"),
        pytest.param(("authorization", "authorization"), id="two authorization headers"),
    ],
)
async def test_a_call_with_more_than_one_credential_is_refused(stack: LocalStack, credentials: tuple[str, str]) -> None:
    # Even the same valid key twice: the edge limits a call as one key, and it must be billed as that one.
    key = stack.demo_api_key
    values = {"x-api-key": key, "authorization": f"Bearer {key}"}
    metadata = tuple((name, values[name]) for name in credentials)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(prompt="The river", sampling=sampling())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(request, metadata=metadata, timeout=10):
                pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "one credential" in (caught.value.details() or "")
