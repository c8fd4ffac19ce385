"""The ``sluice`` command: the user's own commands, and those other installed sluice packages add.

``generate``, ``admin`` and ``trace`` need only the public API. Another
package adds a command by naming a module under the ``sluice.commands``
entry-point group (the local-stack library adds ``up`` and ``bench``), so this
package imports none of them and installs without the services.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Coroutine
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from sluice_cli import admin, generate, trace_view

COMMANDS = "sluice.commands"


class Command(Protocol):
    """What a module registered under ``sluice.commands`` provides."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> Coroutine[Any, Any, int]: ...


def main() -> None:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: LLM serving over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    runs: dict[str, Callable[[argparse.Namespace], int]] = {}
    generate.add_arguments(commands.add_parser("generate", help="stream a completion from the public API"))
    runs["generate"] = lambda args: asyncio.run(generate.run(args))
    trace_view.add_arguments(commands.add_parser("trace", help="show a request's trace from the local stack"))
    runs["trace"] = trace_view.run
    admin.add_arguments(commands.add_parser("admin", help="tenants and API keys"))
    runs["admin"] = lambda args: asyncio.run(admin.run(args))
    for entry in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        command = cast(Command, entry.load())
        command.add_arguments(commands.add_parser(entry.name, help=command.HELP))
        runs[entry.name] = functools.partial(_run, command)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(runs[args.command](args))


def _run(command: Command, args: argparse.Namespace) -> int:
    return asyncio.run(command.run(args))
