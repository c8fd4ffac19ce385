"""A small OTLP/gRPC trace receiver: keeps spans in memory and appends them to a JSON-lines file.

The local stack points Envoy and every service at it, so ``sluice trace`` can
show where a request's time went without running a tracing backend; the tests
use it to check that one trace spans Envoy, queue and inference.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, line: str) -> Span:
        return cls(**json.loads(line))


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def spans_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", "unknown"))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_id=span.parent_span_id.hex(),
                    name=span.name,
                    service=service,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in span.attributes},
                )


class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self.spans: list[Span] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = list(spans_from_request(request))
        with self._lock:
            self.spans.extend(received)
        if self._path is not None:
            with self._path.open("a") as out:
                out.writelines(span.to_json() + "\n" for span in received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


async def start_sink(host: str, port: int, path: Path | None = None) -> tuple[grpc.aio.Server, TraceSink, int]:
    """Serve a sink on ``host:port`` (0 picks a port); returns the server, the sink and the port."""
    sink = TraceSink(path)
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, sink, bound


def read_spans(path: Path, trace_id: str) -> list[Span]:
    if not path.is_file():
        return []
    with path.open() as lines:
        return [span for line in lines if (span := Span.from_json(line)).trace_id == trace_id]
