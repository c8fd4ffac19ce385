"""``sluice bench [kind]``: the benchmarks every installed sluice package registers.

A package adds one by naming a module under the ``sluice.benchmarks``
entry-point group; benchmarks that need a service's internals live in that
service. ``path`` (the whole stack against the bare engine) runs when no kind
is named.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from typing import cast

from sluice_cli.main import Command

HELP = "benchmarks (the stack vs the bare engine, or one part)"
BENCHMARKS = "sluice.benchmarks"
DEFAULT = "path"


def _benchmarks() -> dict[str, Command]:
    return {e.name: cast(Command, e.load()) for e in sorted(entry_points(group=BENCHMARKS), key=lambda e: e.name)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benchmarks = _benchmarks()
    kinds = parser.add_subparsers(dest="bench", required=DEFAULT not in benchmarks)
    for name, benchmark in benchmarks.items():
        if name == DEFAULT:
            benchmark.add_arguments(parser)  # `sluice bench` alone takes its options
        else:
            benchmark.add_arguments(kinds.add_parser(name, help=benchmark.HELP))


async def run(args: argparse.Namespace) -> int:
    return await _benchmarks()[args.bench or DEFAULT].run(args)
