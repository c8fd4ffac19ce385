"""The local stack's trace sink: spans appended as JSON lines, the file moved aside when full."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from sluice_cli.spans import read_spans, rotated
from sluice_devstack.trace_sink import TraceSink


def export(trace_id: str) -> trace_service_pb2.ExportTraceServiceRequest:
    span = trace_pb2.Span(trace_id=bytes.fromhex(trace_id), span_id=bytes(8), name="generate" * 10)
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[span])])]
    )


async def test_a_full_trace_file_is_moved_aside_and_traces_are_found_across_both(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    sink = TraceSink(path, max_bytes=4096)
    for i in range(40):  # each export about 200 bytes: the file fills twice
        await sink.Export(export(f"{i:032x}"), None)  # type: ignore[arg-type]
    assert path.stat().st_size < 4096 + 512 and rotated(path).stat().st_size < 4096 + 512
    kept = [i for i in range(40) if read_spans(path, f"{i:032x}")]
    assert kept == list(range(kept[0], 40)) and kept[0] > 0  # the newest, across both files; the oldest gone
