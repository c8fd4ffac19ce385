"""The shared interceptor: what a caller sees when a handler succeeds or fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core import errors
from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_core.telemetry import TRACE_ID_KEY


class Failing(inference_pb2_grpc.InferenceServicer):
    """Raises whatever the request's prompt names."""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        yield inference_pb2.GenerateResponse()
        match request.prompt:
            case "invalid":
                raise errors.InvalidArgument.field("sampling.top_p", "must be in (0, 1]")
            case "busy":
                raise errors.ResourceExhausted("queue full", retry_after_s=2.5)
            case "bug":
                raise RuntimeError("secret database password in a traceback")

    async def GetLoad(
        self, request: inference_pb2.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.Load:
        return inference_pb2.Load(running=1)


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    server = GrpcServer(ServiceSettings(drain_delay_s=0), ["test"], handle_signals=False)
    server.add(inference_pb2_grpc.add_InferenceServicer_to_server, Failing(), "test")  # type: ignore[abstract]
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


async def fail(stub: inference_pb2_grpc.InferenceAsyncStub, prompt: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Generate(inference_pb2.GenerateRequest(prompt=prompt)):
            pass
    return caught.value


def trace_id(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(TRACE_ID_KEY, ""))


async def test_bad_input_names_the_field(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    error = await fail(stub, "invalid")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    mapped = errors.from_rpc_error(error)
    assert isinstance(mapped, errors.InvalidArgument)
    assert mapped.violations == (errors.FieldViolation("sampling.top_p", "must be in (0, 1]"),)


async def test_overload_carries_a_retry_hint(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    error = await fail(stub, "busy")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    mapped = errors.from_rpc_error(error)
    assert isinstance(mapped, errors.ResourceExhausted)
    assert mapped.retry_after_s == pytest.approx(2.5)


async def test_unexpected_errors_are_internal_and_hide_details(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    error = await fail(stub, "bug")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "password" not in (error.details() or "")
    assert "trace id" in (error.details() or "")
    assert len(trace_id(error)) == 32


async def test_success_returns_the_trace_id(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    call = stub.Generate(inference_pb2.GenerateRequest(prompt="fine"))
    assert [response async for response in call] == [inference_pb2.GenerateResponse()]
    metadata = dict(await call.trailing_metadata() or ())
    assert len(str(metadata[TRACE_ID_KEY])) == 32


async def test_capacity_probes_are_not_traced(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    call = stub.GetLoad(inference_pb2.GetLoadRequest())
    assert (await call).running == 1
    assert TRACE_ID_KEY not in dict(await call.trailing_metadata() or ())


async def test_health_reports_not_serving_until_ready() -> None:
    from grpc_health.v1 import health_pb2_grpc

    server = GrpcServer(ServiceSettings(drain_delay_s=0), ["svc"], handle_signals=False)
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            response = await health.Check(health_pb2.HealthCheckRequest(service="svc"))
            return int(response.status)

        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.set_serving(True)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        await server.set_serving(False)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
