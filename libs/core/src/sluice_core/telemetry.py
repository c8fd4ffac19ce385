"""Tracing: a tracer provider per process, OTLP export when configured, gRPC client instrumentation.

W3C ``traceparent`` travels in gRPC metadata: every server continues the
caller's trace (Envoy's span, when the call came through Envoy; see
``sluice_core.interceptors``) and every instrumented client call carries the
current span on to the next hop.
"""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

TRACE_ID_KEY = "x-trace-id"

# Health checks and the queue's capacity probes run several times a second on every
# replica: traced, they would outnumber the requests in the trace store (4,000 probe
# spans against 190 requests in one benchmark) and cost every process CPU to export.
_UNTRACED_SERVICE = "/grpc.health.v1.Health/"
_UNTRACED_METHODS = ("/GetModelInfo", "/GetLoad")


def traced(call: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> bool:
    """Whether a call (a server's or a client's) gets a span.

    Plain string tests: OpenTelemetry's ``filters`` spent 6% of a queue
    replica's CPU on type checks of the call's details.
    """
    method: str | bytes = call.method  # bytes in a client interceptor's details, whatever the stubs say
    name = method.decode() if isinstance(method, bytes) else method
    return not name.startswith(_UNTRACED_SERVICE) and not name.endswith(_UNTRACED_METHODS)


_provider: TracerProvider | None = None


def setup_tracing(service: str, replica_id: str, otlp_endpoint: str | None) -> TracerProvider:
    """Install the global tracer provider and instrument gRPC clients; call once, before creating channels.

    Spans are always recorded, so every request has a trace id to report back
    to its caller, but only exported when ``otlp_endpoint`` is set.
    """
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.instance.id": replica_id}))
    if otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorClient(filter_=traced).instrument()  # type: ignore[no-untyped-call]
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush buffered spans; call last during shutdown."""
    if _provider is not None:
        _provider.shutdown()


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or "" outside a recorded span."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""
