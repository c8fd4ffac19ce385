"""A replica serving the simulated engine over gRPC: the same servicer, load reports and stream cadence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from sluice.common.v1 import common_pb2
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_devstack.waiting import eventually
from sluice_inference import SERVICE_NAME
from sluice_inference.host import ModelHost
from sluice_inference.servicer import InferenceServicer
from sluice_inference.settings import InferenceSettings

SLOTS = 48
STEP_MS = 20.0
INTERVAL_S = 0.05


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    settings = InferenceSettings(
        engine="simulated",
        max_num_seqs=SLOTS,
        max_model_len=512,
        simulated_step_base_ms=STEP_MS,
        simulated_step_per_sequence_ms=0,
        simulated_prefill_per_token_ms=0,
        drain_delay_s=0,
    )
    host = ModelHost(settings)
    server = GrpcServer(settings, [SERVICE_NAME], handle_signals=False)
    servicer = InferenceServicer(host, "simulated", messages_per_s=80, max_chunk_interval_s=INTERVAL_S)
    server.add(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, SERVICE_NAME)
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await host.start()
        await server.set_serving(True)
        yield inference_pb2_grpc.InferenceStub(channel)
    await host.close()


def generate(max_tokens: int) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return inference_pb2.GenerateRequest(prompt="The river", sampling=sampling)


async def test_model_info_says_the_engine_is_simulated(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    info = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert (info.dtype, info.slots, info.max_model_len) == ("simulated", SLOTS, 512)


async def test_requests_beyond_the_slots_are_reported_waiting(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    async def drain(
        call: grpc.aio.UnaryStreamCall[inference_pb2.GenerateRequest, inference_pb2.GenerateResponse],
    ) -> None:
        async for _ in call:
            pass

    calls = [stub.Generate(generate(max_tokens=40)) for _ in range(SLOTS + 5)]
    streams = [asyncio.create_task(drain(call)) for call in calls]

    async def every_slot_taken() -> bool:
        return (await stub.GetLoad(inference_pb2.GetLoadRequest())).running >= SLOTS

    await eventually(every_slot_taken, 5, "every slot taken")
    load = await stub.GetLoad(inference_pb2.GetLoadRequest())
    assert (load.running, load.waiting) == (SLOTS, 5)
    assert load.kv_cache_usage > 0
    await asyncio.gather(*streams)
    load = await stub.GetLoad(inference_pb2.GetLoadRequest())
    assert (load.running, load.waiting) == (0, 0)


async def test_every_stream_gets_a_message_each_interval_however_many_run(
    stub: inference_pb2_grpc.InferenceAsyncStub,
) -> None:
    # 48 streams share a budget of 80 messages a second: the old rule held each for 0.6 s.
    async def gaps() -> list[float]:
        arrivals = [time.perf_counter() async for r in stub.Generate(generate(max_tokens=50)) if r.HasField("delta")]
        return [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]

    per_stream = await asyncio.gather(*(gaps() for _ in range(SLOTS)))
    longest = max(max(g) for g in per_stream)
    # The bound is the interval plus a step; a generous margin for a busy test machine.
    assert longest < 4 * (INTERVAL_S + STEP_MS / 1e3), f"a stream waited {longest:.3f}s between messages"
    messages = sorted(len(g) + 1 for g in per_stream)
    assert messages[0] >= 10, f"only {messages[0]} messages for 50 tokens over a second"
