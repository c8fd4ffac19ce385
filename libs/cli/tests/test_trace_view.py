"""``sluice trace``: spans printed as a tree, hop by hop, with offsets and durations."""

from __future__ import annotations

import argparse
from pathlib import Path

from sluice_cli.spans import Span, read_spans
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
