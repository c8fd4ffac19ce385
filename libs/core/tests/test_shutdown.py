"""Shutdown: NOT_SERVING first, in-flight calls finish, then the server is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_devstack.waiting import eventually


class Slow(inference_pb2_grpc.InferenceServicer):
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        for _ in range(10):
            await asyncio.sleep(0.1)  # not synchronisation: a stream long enough to be in flight at the stop
            yield inference_pb2.GenerateResponse()


async def test_stop_drains_in_flight_streams() -> None:
    server = GrpcServer(ServiceSettings(drain_delay_s=0.3, shutdown_grace_s=5), ["svc"], handle_signals=False)
    server.add(inference_pb2_grpc.add_InferenceServicer_to_server, Slow(), "svc")  # type: ignore[abstract]
    await server.start()
    await server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)

    responses = aiter(stub.Generate(inference_pb2.GenerateRequest()))
    await anext(responses)  # in flight
    stopping = asyncio.create_task(server.stop())

    # While draining, health checkers are told to go elsewhere (a check after the drain would fail).
    async def not_serving() -> bool:
        status = await health.Check(health_pb2.HealthCheckRequest(service="svc"))
        return bool(status.status == health_pb2.HealthCheckResponse.NOT_SERVING)

    await eventually(not_serving, 5, "health NOT_SERVING while the server drains")
    assert 1 + len([r async for r in responses]) == 10  # nothing in flight was dropped
    await stopping
    await channel.close()


def test_sigterm_stops_a_service_cleanly() -> None:
    # The queue service needs nothing else to start, so it stands in for every service's main.
    env = {**os.environ, "SLUICE_QUEUE_PORT": "0", "SLUICE_QUEUE_DRAIN_DELAY_S": "0.2"}
    argv = [sys.executable, "-m", "sluice_queue"]
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if "listening on" in line:
                break
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=20) == 0
    assert "draining" in rest and "stopped" in rest
