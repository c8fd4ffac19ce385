"""The shared interceptor: what a caller sees when a handler succeeds or fails, and what its trace shows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core import errors
from sluice_core.channels import insecure_channel
from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_core.telemetry import TRACE_ID_KEY, traced
from sluice_devstack.waiting import eventually


class Failing(inference_pb2_grpc.InferenceServicer):
    """Raises whatever the request's prompt names."""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        yield inference_pb2.GenerateResponse()
        if request.prompt == "flood":
            try:
                while True:  # waits at the yield while gRPC writes: where a cancel finds it
                    yield inference_pb2.GenerateResponse()
            finally:
                trace.get_current_span().set_attribute("test.handler_closed", True)
        match request.prompt:
            case "invalid":
                raise errors.InvalidArgument.field("sampling.top_p", "must be in (0, 1]")
            case "busy":
                raise errors.ResourceExhausted("queue full", retry_after_s=2.5)
            case "bug":
                raise RuntimeError("secret database password in a traceback")
            case "wait":
                await asyncio.sleep(30)  # not synchronisation: a handler still at work when its caller leaves

    async def GetLoad(
        self, request: inference_pb2.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.Load:
        return inference_pb2.Load(running=1)


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    server = GrpcServer(ServiceSettings(drain_delay_s=0), ["test"], handle_signals=False)
    server.add(inference_pb2_grpc.add_InferenceServicer_to_server, Failing(), "test")  # type: ignore[abstract]
    async with server, insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def exported() -> Iterator[InMemorySpanExporter]:
    """The spans the process ends from here on."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@contextlib.contextmanager
def caller_trace(trace_id: int, span_id: int) -> Iterator[None]:
    """The caller's own trace, current while it calls (its channel's interceptor sends it on)."""
    caller = trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(1))
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(caller)))
    try:
        yield
    finally:
        context.detach(token)


def spans_of(
    exporter: InMemorySpanExporter, trace_id: int, kind: trace.SpanKind = trace.SpanKind.SERVER
) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id and span.kind == kind]


async def ended(exporter: InMemorySpanExporter, trace_id: int) -> None:
    """Until the call's server and client spans have both ended: the client's ends from a callback."""

    def both() -> bool:
        return all(spans_of(exporter, trace_id, kind) for kind in (trace.SpanKind.SERVER, trace.SpanKind.CLIENT))

    await eventually(both, 2, f"the server and client spans of trace {trace_id:032x} ended")


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


async def test_a_call_continues_its_callers_trace(
    stub: inference_pb2_grpc.InferenceAsyncStub, exported: InMemorySpanExporter
) -> None:
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    with caller_trace(trace_id, 0xB7AD6B7169203331):
        call = stub.Generate(inference_pb2.GenerateRequest(prompt="fine"))
    assert len([response async for response in call]) == 1
    assert dict(await call.trailing_metadata() or ())[TRACE_ID_KEY] == f"{trace_id:032x}"
    await ended(exported, trace_id)
    (span,) = spans_of(exported, trace_id)
    assert span.name == "/sluice.inference.v1.Inference/Generate"
    (caller,) = spans_of(exported, trace_id, trace.SpanKind.CLIENT)
    assert caller.parent is not None and caller.parent.span_id == 0xB7AD6B7169203331
    assert span.parent is not None and span.parent.span_id == caller.context.span_id
    assert span.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "sluice.inference.v1.Inference",
        "rpc.method": "Generate",
        "rpc.grpc.status_code": 0,
    }


@pytest.mark.parametrize(
    ("prompt", "code", "marked_failed"),
    [("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, False), ("bug", grpc.StatusCode.INTERNAL, True)],
)
async def test_a_failed_call_records_its_status(
    stub: inference_pb2_grpc.InferenceAsyncStub,
    exported: InMemorySpanExporter,
    prompt: str,
    code: grpc.StatusCode,
    marked_failed: bool,
) -> None:
    error = await fail(stub, prompt)
    (span,) = spans_of(exported, int(trace_id(error), 16))
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == code.value[0]
    # A refusal is the caller's to handle; an internal error is the server's failure.
    assert (span.status.status_code == trace.StatusCode.ERROR) is marked_failed


async def test_a_stream_its_caller_cancels_ends_both_spans_as_cancelled(
    stub: inference_pb2_grpc.InferenceAsyncStub, exported: InMemorySpanExporter
) -> None:
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    with caller_trace(trace_id, 0x00F067AA0BA902B7):
        call = stub.Generate(inference_pb2.GenerateRequest(prompt="wait"))
    await anext(aiter(call))
    # Cancelled between two reads and never read again:
    # the client's span ends now, not when the call is garbage-collected.
    call.cancel()
    await ended(exported, trace_id)
    for kind in (trace.SpanKind.SERVER, trace.SpanKind.CLIENT):
        (span,) = spans_of(exported, trace_id, kind)
        assert span.attributes is not None
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0], kind


async def test_a_handler_cancelled_at_a_yield_finishes_its_span_before_it_ends(
    stub: inference_pb2_grpc.InferenceAsyncStub, exported: InMemorySpanExporter
) -> None:
    # The queue and the replicas record how a request ended on the call's span in their
    # handler's clean-up; gRPC drops a handler cancelled at a yield without closing it.
    trace_id = 0x5BF92F3577B34DA6A3CE929D0E0E4737
    with caller_trace(trace_id, 0x00F067AA0BA902B8):
        call = stub.Generate(inference_pb2.GenerateRequest(prompt="flood"))
    responses = aiter(call)
    for _ in range(20):
        await anext(responses)
    call.cancel()
    await eventually(lambda: bool(spans_of(exported, trace_id)), 2, "the handler's span ended")
    (span,) = spans_of(exported, trace_id)
    assert span.attributes is not None and span.attributes.get("test.handler_closed") is True


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("/sluice.inference.v1.Inference/Generate", True),
        (b"/sluice.inference.v1.Inference/Generate", True),  # how a client interceptor sees it
        (b"/sluice.inference.v1.Inference/GetLoad", False),
        ("/sluice.inference.v1.Inference/GetModelInfo", False),
        ("/grpc.health.v1.Health/Check", False),
    ],
)
def test_requests_are_traced_and_probes_are_not(method: str | bytes, expected: bool) -> None:
    details = grpc.aio.ClientCallDetails(method, None, None, None, None)  # type: ignore[arg-type]
    assert traced(details) is expected


async def test_a_request_that_does_not_parse_is_invalid_argument_and_logged_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = GrpcServer(ServiceSettings(drain_delay_s=0), ["test"], handle_signals=False)
    server.add(inference_pb2_grpc.add_InferenceServicer_to_server, Failing(), "test")  # type: ignore[abstract]
    garbage = b"\xff\xff\xff\xff"  # a field tag with no end
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # Raw bytes, as a hostile or broken client sends them.
        generate: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/sluice.inference.v1.Inference/Generate"
        )
        get_load: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/sluice.inference.v1.Inference/GetLoad"
        )
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in generate(garbage):
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await get_load(garbage)
    for caught in (streamed, unary):
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in (caught.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in caplog.records if "not a valid" in r.getMessage()]) == 1  # 40 in well under a second


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_lists_the_services_in_both_versions_grpcurl_asks_for(version: str) -> None:
    server = GrpcServer(ServiceSettings(drain_delay_s=0), ["test"], handle_signals=False)
    server.add(inference_pb2_grpc.add_InferenceServicer_to_server, Failing(), "sluice.inference.v1.Inference")  # type: ignore[abstract]
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info: grpc.aio.StreamStreamMultiCallable[
            reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
        ] = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        response = await call.read()
        call.cancel()
    assert isinstance(response, reflection_pb2.ServerReflectionResponse)
    assert "sluice.inference.v1.Inference" in [s.name for s in response.list_services_response.service]
