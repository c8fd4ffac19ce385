"""A small OTLP/gRPC trace receiver that appends spans to a JSON-lines file.

The local stack runs it as its own process and points Envoy and every service
at it, so ``sluice trace`` can show where a request's time went without a
tracing backend; the tests read the file to check that one trace spans Envoy,
queue and inference. Past ``max_bytes`` the file is moved aside (``.1``,
replacing the one before) and a new one begun: a stack left running keeps at
most twice that, and a trace is looked up in both.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from sluice_cli.spans import Span, rotated


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
    """Appends every span it receives to ``path``, one JSON object per line; ``max_bytes`` 0 keeps all."""

    def __init__(self, path: Path, max_bytes: int = 0) -> None:
        self._path = path
        self._max_bytes = max_bytes

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        lines = "".join(span.to_json() + "\n" for span in spans_from_request(request))
        await asyncio.to_thread(self._append, lines)
        return trace_service_pb2.ExportTraceServiceResponse()

    def _append(self, lines: str) -> None:
        with self._path.open("a") as out:
            out.write(lines)
            full = self._max_bytes and out.tell() >= self._max_bytes
        if full:
            self._path.replace(rotated(self._path))


async def serve(address: str, path: Path, max_bytes: int) -> None:
    server = grpc.aio.server()
    sink = TraceSink(path, max_bytes)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Receive OTLP/gRPC spans and append them to a JSON-lines file.")
    parser.add_argument("address", help="host:port to listen on")
    parser.add_argument("path", type=Path)
    parser.add_argument(
        "--max-mb", type=int, default=0, help="move the file aside past this size in MB (default: never)"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.path, args.max_mb * 2**20))


if __name__ == "__main__":
    main()
