"""What every service's entry point shares: its process set up and torn down, its background jobs stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from sluice_core.logs import setup_logging
from sluice_core.settings import ServiceSettings
from sluice_core.telemetry import setup_tracing, shutdown_tracing


def run(name: str, settings: ServiceSettings, serve: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Logging and tracing as ``settings`` say, ``serve()`` until it returns, then the last spans flushed."""
    setup_logging(name, settings.log_level, settings.log_format)
    setup_tracing(f"sluice-{name}", settings.replica_id, settings.otlp_endpoint)
    try:
        asyncio.run(serve())
    finally:
        shutdown_tracing()


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    """Stop background jobs and wait until they have (whatever they raise on the way out)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
