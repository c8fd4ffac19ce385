"""Tracing: a tracer provider per process, OTLP export when configured, which calls get spans.

W3C ``traceparent`` travels in gRPC metadata: every server continues the
caller's trace (Envoy's span, when the call came through Envoy) and every
call a service makes carries its span on to the next hop (both in
``sluice_core.interceptors``).
"""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

TRACE_ID_KEY = "x-trace-id"

# Health checks and the queue's capacity probes run several times a second on every
# replica: traced, they would outnumber the requests in the trace store (4,000 probe
# spans against 190 requests in one benchmark) and cost every process CPU to export.
_UNTRACED_SERVICE = "/grpc.health.v1.Health/"
_UNTRACED_METHODS = ("/GetModelInfo", "/GetLoad")


def method_of(call: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> str:
    """``/package.Service/Method``."""
    method: str | bytes = call.method  # bytes in a client interceptor's details, whatever the stubs say
    return method.decode() if isinstance(method, bytes) else method


def traced(call: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> bool:
    """Whether a call (a server's or a client's) gets a span.

    Plain string tests: OpenTelemetry's ``filters`` spent a measurable share
    of a queue replica's CPU on type checks of the call's details.
    """
    method = method_of(call)
    return not method.startswith(_UNTRACED_SERVICE) and not method.endswith(_UNTRACED_METHODS)


_provider: TracerProvider | None = None


def setup_tracing(service: str, replica_id: str, otlp_endpoint: str | None) -> TracerProvider:
    """Install the global tracer provider; call once, before serving or calling anything.

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
