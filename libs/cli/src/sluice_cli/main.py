"""The ``sluice`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from sluice_cli import bench, generate, trace_view, up


def main() -> None:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: LLM serving over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate.add_arguments(commands.add_parser("generate", help="stream a completion from the public API"))
    up.add_arguments(commands.add_parser("up", help="run the local stack until Ctrl-C"))
    bench.add_arguments(commands.add_parser("bench", help="benchmark the stack against the bare engine"))
    trace_view.add_arguments(commands.add_parser("trace", help="show a request's trace from the local stack"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    match args.command:
        case "generate":
            code = asyncio.run(generate.run(args))
        case "up":
            code = asyncio.run(up.run(args))
        case "bench":
            code = asyncio.run(bench.run(args))
        case _:
            code = trace_view.run(args)
    sys.exit(code)
