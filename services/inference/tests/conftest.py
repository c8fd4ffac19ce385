"""A real inference server (vLLM engine, tiny model) in this process, shared by the module's tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.inference.v1 import inference_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_devstack.waiting import eventually
from sluice_inference import SERVICE_NAME
from sluice_inference.host import ModelHost
from sluice_inference.servicer import InferenceServicer
from sluice_inference.settings import InferenceSettings

# Small enough that a burst overflows the engine's queue in a test.
MAX_NUM_SEQS = 4
MAX_QUEUED = 8


@dataclass
class Replica:
    stub: inference_pb2_grpc.InferenceAsyncStub
    health: health_pb2_grpc.HealthStub
    host: ModelHost
    status_while_loading: int

    async def status(self) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        return int(response.status)


@pytest.fixture(scope="session")
async def replica() -> AsyncIterator[Replica]:
    settings = InferenceSettings(
        max_model_len=512,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_queued_reqs=MAX_QUEUED,
        enforce_eager=True,  # starts faster; the end-to-end tests run the default
        warmup_requests=2,
        warmup_prompt_tokens=8,
        drain_delay_s=0,
        replica_id="test-replica",
    )
    host = ModelHost(settings)
    server = GrpcServer(settings, [SERVICE_NAME], handle_signals=False)
    server.add(
        inference_pb2_grpc.add_InferenceServicer_to_server, InferenceServicer(host, "test-replica"), SERVICE_NAME
    )
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        loading = asyncio.create_task(host.start())
        await eventually(lambda: host._building is not None, 60, "the engine being built")
        while_loading = int((await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status)
        await loading
        await server.set_serving(True)
        watcher = asyncio.create_task(host.watch(lambda: server.set_serving(False)))
        stub = inference_pb2_grpc.InferenceStub(channel)
        yield Replica(stub, health, host, while_loading)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await host.close()
