"""The inference service with a real vLLM engine serving the tiny model."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from sluice.common.v1 import common_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core import errors
from sluice_devstack.waiting import eventually
from sluice_inference.chunking import hold_s
from sluice_inference.servicer import InferenceServicer

from .conftest import MAX_NUM_SEQS, MAX_QUEUED, Replica

pytestmark = pytest.mark.slow


def generate(prompt: str = "The river", **sampling: object) -> inference_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(**{"max_tokens": 16, **sampling})  # type: ignore[arg-type]
    return inference_pb2.GenerateRequest(prompt=prompt, sampling=params)


async def collect(replica: Replica, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [r async for r in replica.stub.Generate(request)]


async def idle(replica: Replica) -> bool:
    """Whether the replica reports nothing running or waiting, and the engine agrees."""
    load = await replica.stub.GetLoad(inference_pb2.GetLoadRequest())
    return load.running == 0 and load.waiting == 0 and replica.host.unfinished_requests() == 0


async def test_reports_not_serving_while_the_model_loads(replica: Replica) -> None:
    assert replica.status_while_loading == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await replica.status() == health_pb2.HealthCheckResponse.SERVING


async def test_streams_tokens_as_they_are_generated(replica: Replica) -> None:
    responses = await collect(replica, generate(max_tokens=24, ignore_eos=True))
    deltas = [r.delta for r in responses if r.HasField("delta")]
    assert len(deltas) >= 2, "tokens must arrive in pieces, not all at the end"
    assert sum(len(d.token_ids) for d in deltas) == 24
    finished = responses[-1].finished
    assert finished.reason == common_pb2.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 24
    assert finished.usage.prompt_tokens > 0
    assert responses[0].accepted.prompt_tokens == finished.usage.prompt_tokens  # announced before any token
    assert 0 < finished.timings.time_to_first_token_ms <= finished.timings.total_ms
    assert finished.replica_id == "test-replica"


async def test_a_message_budget_sends_the_first_token_at_once_then_fewer_larger_chunks(replica: Replica) -> None:
    # Alone on the replica, a stream gets the whole budget.
    servicer = InferenceServicer(replica.host, "test-replica", messages_per_s=20, max_chunk_interval_s=0.05)
    request = generate(max_tokens=64, ignore_eos=True)
    start = time.monotonic()
    chunks = [len(r.delta.token_ids) async for r in servicer.Generate(request, None) if r.HasField("delta")]  # type: ignore[arg-type]
    elapsed_s = time.monotonic() - start
    assert sum(chunks) == 64
    assert chunks[0] == 1, "the first token must not wait for the next chunk"
    # However fast this machine generates: the first token, one chunk per beat, and the last tokens sent early.
    beat_s = hold_s(1, messages_per_s=20, max_interval_s=0.05)
    assert len(chunks) <= 3 + elapsed_s / beat_s, f"{len(chunks)} chunks in {elapsed_s:.2f} s: tokens were not merged"


async def test_same_seed_same_text(replica: Replica) -> None:
    def text(responses: list[inference_pb2.GenerateResponse]) -> str:
        return "".join(r.delta.text for r in responses)

    first = await collect(replica, generate(temperature=1.0, seed=42, ignore_eos=True))
    second = await collect(replica, generate(temperature=1.0, seed=42, ignore_eos=True))
    assert text(first) == text(second)


async def test_model_info_describes_the_engine(replica: Replica) -> None:
    info = await replica.stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert info.max_model_len == 512
    assert info.slots == MAX_NUM_SEQS
    assert info.dtype == "float32"
    assert info.model_name == "sluice-tiny"


# 600 words are tokenized on the event loop, 3,000 (18,000 characters) on a thread of their own,
# and 40,000 refused before tokenizing: no token of the tiny model stands for more than 9 characters.
@pytest.mark.parametrize("words", [600, 3_000, 40_000])
async def test_prompt_longer_than_the_context_is_invalid(replica: Replica, words: int) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(replica, generate(prompt="river " * words))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = errors.from_rpc_error(caught.value)
    assert isinstance(error, errors.InvalidArgument) and error.violations[0].field == "prompt"


async def test_max_tokens_beyond_the_context_is_invalid(replica: Replica) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(replica, generate(max_tokens=600))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in (caught.value.details() or "")


async def test_cancelling_a_stream_aborts_the_engine_request(replica: Replica) -> None:
    call = replica.stub.Generate(generate(max_tokens=400, ignore_eos=True))
    async for response in call:
        if response.HasField("delta"):
            break
    load = await replica.stub.GetLoad(inference_pb2.GetLoadRequest())
    assert load.running == 1
    call.cancel()
    assert await eventually(functools.partial(idle, replica), 1.0, "the replica idle") < 1.0


async def test_an_expired_deadline_stops_the_generation(replica: Replica) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in replica.stub.Generate(generate(max_tokens=500, ignore_eos=True), timeout=0.3):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await eventually(functools.partial(idle, replica), 1.0, "the replica idle") < 1.0


async def test_a_full_engine_queue_sheds_with_a_retry_hint(replica: Replica) -> None:
    async def one() -> str:
        try:
            await collect(replica, generate(max_tokens=100, ignore_eos=True))
        except grpc.aio.AioRpcError as exc:
            error = errors.from_rpc_error(exc)
            assert isinstance(error, errors.ResourceExhausted) and error.retry_after_s
            return exc.code().name
        return "OK"

    outcomes = await asyncio.gather(*(one() for _ in range(MAX_QUEUED * 2)))
    assert outcomes.count("OK") >= MAX_QUEUED
    assert outcomes.count("RESOURCE_EXHAUSTED") >= 1
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED"}
    await eventually(functools.partial(idle, replica), 5.0, "the replica idle")


# Last: it kills the shared engine.
async def test_a_dead_engine_turns_the_replica_unavailable(replica: Replica) -> None:
    engine_processes = [p for p in psutil.Process(os.getpid()).children(recursive=True) if "EngineCore" in p.name()]
    assert engine_processes
    for process in engine_processes:
        os.kill(process.pid, signal.SIGKILL)

    async def not_serving() -> bool:
        return await replica.status() == health_pb2.HealthCheckResponse.NOT_SERVING

    await eventually(not_serving, 10, "health NOT_SERVING after the engine died", interval_s=0.1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(replica, generate())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
