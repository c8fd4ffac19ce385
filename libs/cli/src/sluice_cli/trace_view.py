"""``sluice trace TRACE_ID``: where one request's time went, hop by hop.

Reads the spans the local stack's trace sink wrote; each line is a span, as
a tree under its parent: start offset from the first span, duration, the
service that recorded it, its name and the request's timings.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from sluice_cli.spans import Span, read_spans

SHOWN_ATTRIBUTES = (
    "sluice.request_id",
    "sluice.replica_id",
    "sluice.outcome",
    "sluice.queue_time_s",
    "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.completion_tokens",
    "gen_ai.latency.time_in_queue",
    "gen_ai.latency.time_to_first_token",
    "gen_ai.latency.e2e",
    "rpc.grpc.status_code",
    "upstream_address",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Trace ids are stored in lower case; one copied from elsewhere may not be.
    parser.add_argument("trace_id", type=str.lower)
    parser.add_argument("--file", type=Path, default=Path(".sluice/traces.jsonl"), help="default %(default)s")


def format_trace(spans: list[Span]) -> str:
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[Span]] = defaultdict(list)
    roots: list[Span] = []
    for span in spans:
        (children[span.parent_id] if span.parent_id in by_id else roots).append(span)
    origin = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    services = sorted({s.service for s in spans})
    lines = [f"trace {spans[0].trace_id}: {len(spans)} spans, {(end - origin) / 1e6:.1f} ms, {', '.join(services)}"]

    def walk(span: Span, depth: int) -> None:
        attrs = " ".join(f"{k}={_fmt(span.attributes[k])}" for k in SHOWN_ATTRIBUTES if k in span.attributes)
        lines.append(
            f"{(span.start_ns - origin) / 1e6:9.2f} ms {span.duration_ms:9.2f} ms  "
            f"{'  ' * depth}{span.service}: {span.name}  {attrs}".rstrip()
        )
        for child in sorted(children[span.span_id], key=lambda s: s.start_ns):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda s: s.start_ns):
        walk(root, 0)
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    spans = read_spans(args.file, args.trace_id)
    if not spans:
        print(
            f"no spans for trace {args.trace_id} in {args.file} (spans arrive a few seconds after a request)",
            file=sys.stderr,
        )
        return 1
    print(format_trace(spans))
    return 0
