"""The ``sluice`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from sluice_cli import (
    admin,
    bench,
    bench_datastore,
    bench_ratelimit,
    bench_scale,
    bench_scheduler,
    generate,
    trace_view,
    up,
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: LLM serving over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate.add_arguments(commands.add_parser("generate", help="stream a completion from the public API"))
    up.add_arguments(commands.add_parser("up", help="run the local stack until Ctrl-C"))
    benches = commands.add_parser("bench", help="benchmarks (the stack vs the bare engine, or one part)")
    bench_kinds = benches.add_subparsers(dest="bench", required=False)
    bench.add_arguments(benches)
    bench_ratelimit.add_arguments(bench_kinds.add_parser("ratelimit", help="ShouldRateLimit against a bare EVALSHA"))
    bench_datastore.add_arguments(bench_kinds.add_parser("datastore", help="cached, cold and unindexed data access"))
    bench_scheduler.add_arguments(
        bench_kinds.add_parser("scheduler", help="priorities under overload, and the queue's cost at low load")
    )
    bench_scale.add_arguments(
        bench_kinds.add_parser("scale", help="concurrent streams the stack carries at GPU speed (simulated engines)")
    )
    trace_view.add_arguments(commands.add_parser("trace", help="show a request's trace from the local stack"))
    admin.add_arguments(commands.add_parser("admin", help="tenants and API keys"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    match args.command:
        case "generate":
            code = asyncio.run(generate.run(args))
        case "admin":
            code = asyncio.run(admin.run(args))
        case "up":
            code = asyncio.run(up.run(args))
        case "bench" if args.bench == "datastore":
            code = asyncio.run(bench_datastore.run(args))
        case "bench" if args.bench == "scheduler":
            code = asyncio.run(bench_scheduler.run(args))
        case "bench" if args.bench == "scale":
            code = asyncio.run(bench_scale.run(args))
        case "bench" if args.bench == "ratelimit":
            code = asyncio.run(bench_ratelimit.run(args))
        case "bench":
            code = asyncio.run(bench.run(args))
        case _:
            code = trace_view.run(args)
    sys.exit(code)
