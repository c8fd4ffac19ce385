"""``sluice trace``: spans printed as a tree, hop by hop, with offsets and durations."""

from __future__ import annotations

import argparse
from pathlib import Path

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from sluice_cli.trace_sink import Span, TraceSink, read_spans, rotated
from sluice_cli.trace_view import add_arguments, format_trace


def span(span_id: str, parent: str, service: str, name: str, start_ms: float, end_ms: float) -> Span:
    return Span(
        "t1", span_id, parent, name, service, int(start_ms * 1e6), int(end_ms * 1e6), {"sluice.outcome": "stop"}
    )


def test_spans_print_as_a_tree_in_start_order(tmp_path: Path) -> None:
    spans = [
        span("c", "b", "sluice-inference", "generate", 3, 9),
        span("a", "", "sluice-envoy", "ingress", 0, 10),
        span("b", "a", "sluice-queue", "Generate", 1, 9.5),
    ]
    path = tmp_path / "traces.jsonl"
    path.write_text(
        "".join(s.to_json() + "\n" for s in spans)
        + span("x", "", "other", "x", 0, 1).to_json().replace('"t1"', '"t2"')
        + "\n"
    )
    loaded = read_spans(path, "t1")
    assert len(loaded) == 3
    lines = format_trace(loaded).splitlines()
    assert lines[0] == "trace t1: 3 spans, 10.0 ms, sluice-envoy, sluice-inference, sluice-queue"
    assert [line.split("  ")[-2].strip() for line in lines[1:]] == [
        "sluice-envoy: ingress",
        "sluice-queue: Generate",
        "sluice-inference: generate",
    ]
    assert lines[3].startswith("     3.00 ms      6.00 ms")


def test_a_trace_id_is_found_whatever_its_case(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = tmp_path / "traces.jsonl"
    path.write_text(span("a", "", "sluice-envoy", "ingress", 0, 1).to_json().replace('"t1"', '"4bf92f35"') + "\n")
    args = parser.parse_args(["4BF92F35", "--file", str(path)])
    assert len(read_spans(args.file, args.trace_id)) == 1


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
