"""OpenAI's API through Envoy's edge, driven by the official ``openai`` SDK as its users would drive it.

The shared stack's front (services/openai) translates each request to the
Generation API; these tests check what an OpenAI client sees: the shapes,
usage, errors as the SDK's typed exceptions, queue positions, deadlines,
stored conversations, cancellation reaching the engine, and one trace.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_client import GenerationClient
from sluice_devstack import floor
from sluice_devstack.stack import LocalStack
from sluice_devstack.waiting import eventually

from .conftest import LIMITED_PER_HOUR, OPENAI_LIMITED_KEY, SLOTS_PER_REPLICA
from .test_stack import idle

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "sluice-tiny"
LONG = {"ignore_eos": True}  # vLLM's extension: run to max_tokens


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[AsyncOpenAI]:
    # No retries: a test sees each answer as it came.
    async with AsyncOpenAI(base_url=f"http://{stack.edge}/v1", api_key=stack.demo_api_key, max_retries=0) as sdk:
        yield sdk


async def both_idle(stack: LocalStack) -> bool:
    return all([await idle(stack, 0), await idle(stack, 1)])


async def test_models_lists_the_served_model(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_a_completion_comes_whole_with_its_usage(client: AsyncOpenAI) -> None:
    completion = await client.completions.create(model=MODEL, prompt="The river", max_tokens=12, extra_body=LONG)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


async def test_a_chat_streams_chunks_then_its_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    text_chunks = [c for c in chunks if c.choices]
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks)
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and usage.completion_tokens == 10


async def test_the_same_seed_gives_the_same_text_over_http_as_over_grpc(stack: LocalStack, client: AsyncOpenAI) -> None:
    completion = await client.completions.create(
        model=MODEL, prompt="The river", max_tokens=16, seed=7, temperature=1.0, extra_body=LONG
    )
    sampling = common_pb2.SamplingParams(max_tokens=16, seed=7, temperature=1.0, ignore_eos=True)
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as grpc_client:
        request = generation_pb2.GenerateRequest(prompt="The river", sampling=sampling)
        texts = [e.delta.text async for e in grpc_client.generate(request, timeout=30) if e.HasField("delta")]
    assert completion.choices[0].text == "".join(texts)


async def test_errors_are_the_sdks_typed_exceptions(stack: LocalStack, client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=2)
    assert bad.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.completions.create(model=MODEL, prompt="river " * 3000, max_tokens=4)
    assert too_long.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    stranger = client.with_options(api_key="sk-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        await stranger.completions.create(model=MODEL, prompt="x", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_headers={"x-sluice-conversation": str(uuid.uuid4())},
        )


async def test_over_the_edge_limit_is_a_rate_limit_error_with_retry_after(client: AsyncOpenAI) -> None:
    limited = client.with_options(api_key=OPENAI_LIMITED_KEY)
    for _ in range(LIMITED_PER_HOUR):  # let through by Envoy, refused by the queue: no such key
        with pytest.raises(openai.AuthenticationError):
            await limited.completions.create(model=MODEL, prompt="x", max_tokens=4)
    with pytest.raises(openai.RateLimitError) as limit:
        await limited.completions.create(model=MODEL, prompt="x", max_tokens=4)
    assert int(limit.value.response.headers["retry-after"]) > 0
    assert limit.value.body["type"] == "rate_limit_error"  # type: ignore[index]


async def test_a_deadline_header_ends_the_request_with_504(stack: LocalStack, client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as late:
        await client.completions.create(
            model=MODEL, prompt="x", max_tokens=1500, extra_body=LONG, extra_headers={"x-sluice-timeout": "0.5"}
        )
    assert late.value.status_code == 504
    await eventually(functools.partial(both_idle, stack), 5, "the expired request no longer runs")


async def test_a_conversation_keeps_its_history_over_http(stack: LocalStack, client: AsyncOpenAI) -> None:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as grpc_client:
        conversation = await grpc_client.create_conversation(timeout=10)
    headers = {"x-sluice-conversation": conversation}
    turn = [{"role": "user", "content": "Tell me about the river."}]
    first = await client.chat.completions.create(model=MODEL, messages=turn, max_tokens=8, extra_headers=headers)  # type: ignore[arg-type]
    second = await client.chat.completions.create(model=MODEL, messages=turn, max_tokens=8, extra_headers=headers)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    # The second turn's prompt holds the first exchange too.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 8


async def test_a_waiting_stream_is_told_its_place_in_comments(stack: LocalStack) -> None:
    slots = 2 * SLOTS_PER_REPLICA
    sampling = common_pb2.SamplingParams(max_tokens=1500, ignore_eos=True)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
    headers = {"authorization": f"Bearer {stack.demo_api_key}"}
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as grpc_client:
        busy = [
            grpc_client.generate(generation_pb2.GenerateRequest(prompt="x", sampling=sampling), timeout=60)
            for _ in range(slots)
        ]
        try:
            for stream in busy:  # every slot taken
                async for event in stream:
                    if event.HasField("delta"):
                        break
            async with (
                httpx.AsyncClient(base_url=f"http://{stack.edge}") as http,
                http.stream("POST", "/v1/completions", json=body, headers=headers, timeout=30) as response,
            ):
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith(": queued position=")  # what curl -N shows
                for stream in busy:
                    stream.cancel()
                rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
        finally:
            for stream in busy:
                stream.cancel()


async def test_closing_the_sdks_stream_aborts_the_request_at_the_engine(stack: LocalStack, client: AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model=MODEL, prompt="The river", max_tokens=1500, stream=True, extra_body=LONG
    )
    trace_id = stream.response.headers["x-trace-id"]
    async for chunk in stream:
        if chunk.choices[0].text:
            break
    await stream.close()
    await eventually(functools.partial(both_idle, stack), 2, "the engines stop generating for a closed stream")

    async def told() -> bool:
        spans = stack.spans(trace_id)
        return any(s.name == "inference.generate" and s.attributes.get("sluice.outcome") == "cancelled" for s in spans)

    await eventually(told, 15, f"trace {trace_id} says the engine's request was cancelled")


async def test_one_trace_holds_envoy_the_front_the_queue_and_the_engine(stack: LocalStack, client: AsyncOpenAI) -> None:
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    response = await client.completions.with_raw_response.create(
        model=MODEL, prompt="x", max_tokens=4, extra_headers={"traceparent": traceparent}
    )
    trace_id = response.headers["x-trace-id"]
    assert trace_id == traceparent.split("-")[1]  # the caller's trace, continued
    wanted = {"sluice-envoy", "sluice-openai", "sluice-queue", "sluice-inference"}

    async def complete() -> bool:
        return {s.service for s in stack.spans(trace_id)} >= wanted

    await eventually(complete, 15, f"spans of {trace_id} from {wanted}")
    spans = stack.spans(trace_id)
    (front,) = [s for s in spans if s.name == "POST /v1/completions"]
    (edge,) = [s for s in spans if s.span_id == front.parent_id]
    assert edge.service == "sluice-envoy"


async def test_the_fronts_transport_floor_goes_through_the_front(stack: LocalStack) -> None:
    # `sluice bench openai` sets the front's added time to first token against these round trips.
    async def to_front() -> int:
        stats = await stack.envoy_admin("/stats?filter=^cluster[.]openai[.]upstream_rq_total$")
        return int(stats.split(":")[-1])

    before = await to_front()
    trips = await floor.transport(stack, over_openai=True)
    assert set(trips) == {"openai", "inference", "redis", "total"}
    assert trips["openai"] > trips["redis"] > 0
    assert await to_front() - before > 200  # every round trip, and the warm-up, crossed the front
