"""The whole stack on real vLLM engines: a replica that loads the model, the model's tokens, and a clean stop.

The other end-to-end tests run on the simulated engine; these are what only
the real one shows: a replica that takes a while to load gets no traffic,
the tiny model's tokens stream through every hop, and stopping the stack
lets a stream in flight finish although vLLM's engine core aborts all it
holds when it is signalled. The tests run in file order on one stack,
started with one replica; the last one stops it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from grpc_health.v1 import health_pb2

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_client import GenerationClient
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LocalStack
from sluice_devstack.waiting import eventually

from .conftest import requests_served, stack_options

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
async def vllm_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, postgres: PostgresServer
) -> AsyncIterator[LocalStack]:
    """Starts with one replica; the first test starts the second."""
    local = LocalStack(stack_options(tmp_path_factory.mktemp("vllm-stack"), redis_server, postgres, "vllm"))
    try:
        await local.start(replicas=1)
        yield local
    finally:
        await local.stop()


def request(max_tokens: int) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return generation_pb2.GenerateRequest(prompt="The river", sampling=sampling)


async def events(stack: LocalStack, req: generation_pb2.GenerateRequest) -> list[generation_pb2.GenerateEvent]:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        return [event async for event in client.generate(req, timeout=60)]


async def test_a_replica_still_loading_gets_no_traffic(vllm_stack: LocalStack) -> None:
    stack = vllm_stack
    stack.start_inference(1)

    async def answering_not_serving() -> bool:
        return bool(await stack.replica_status(1) == health_pb2.HealthCheckResponse.NOT_SERVING)

    await eventually(answering_not_serving, 60, "replica 2 answers health checks while loading")
    sent = 0
    while await answering_not_serving():
        received = await events(stack, request(max_tokens=4))
        assert received[-1].HasField("finished")
        sent += 1
    assert sent >= 5, "the replica loaded too fast to watch"
    assert requests_served(stack, 1) == 0
    await stack.wait_ready(replicas=2)
    assert requests_served(stack, 1) >= 1, "ready means the new replica has served a request"


async def test_the_models_tokens_stream_through_every_hop(vllm_stack: LocalStack) -> None:
    async with vllm_stack.channel(vllm_stack.internal) as channel:
        info = await inference_pb2_grpc.InferenceStub(channel).GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert info.dtype == "float32", "a real engine, not the simulated one"
    received = await events(vllm_stack, request(max_tokens=32))
    deltas = [event.delta for event in received if event.HasField("delta")]
    assert len(deltas) >= 2, "tokens must arrive as they are generated"
    finished = received[-1].finished
    assert finished.usage.completion_tokens == 32 == sum(len(d.token_ids) for d in deltas)
    assert finished.reason == common_pb2.FINISH_REASON_LENGTH
    assert "".join(d.text for d in deltas), "the tiny model's tokens are text"


async def test_stopping_the_stack_lets_streams_in_flight_finish_and_bills_them(
    vllm_stack: LocalStack, postgres: PostgresServer
) -> None:
    # What Ctrl-C on `make up` does; the stack is gone after this test.
    stopping: asyncio.Task[None] | None = None
    async with GenerationClient(vllm_stack.edge, api_key=vllm_stack.demo_api_key) as client:

        async def one() -> list[generation_pb2.GenerateEvent]:
            nonlocal stopping
            received = []
            async for event in client.generate(request(max_tokens=300), timeout=60):
                received.append(event)
                if event.HasField("delta") and stopping is None:
                    stopping = asyncio.create_task(vllm_stack.stop())
            return received

        streams = await asyncio.gather(*(one() for _ in range(4)))
    assert stopping is not None
    await stopping
    for received in streams:
        assert received[-1].HasField("finished"), "a stream in flight must finish, not be cut"
        assert received[-1].finished.reason == common_pb2.FINISH_REASON_LENGTH
        assert received[-1].finished.usage.completion_tokens == 300
    # The queues stopped before the data-access service: every one of them is billed.
    connection = await asyncpg.connect(postgres.url)
    try:
        ids = [received[-1].finished.request_id for received in streams]
        rows = await connection.fetch("SELECT completion_tokens FROM usage WHERE request_id = ANY($1::text[])", ids)
    finally:
        await connection.close()
    assert [row["completion_tokens"] for row in rows] == [300] * 4
    logs = [vllm_stack.process(f"queue-{i}").log_path.read_text() for i in (1, 2)]
    assert not any("could not be written" in log for log in logs)
