"""What every service's entry point shares: its process set up and torn down, its background jobs stopped."""

from __future__ import annotations

import asyncio
import gc
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


def freeze_heap() -> None:
    """Exempt everything allocated so far from garbage collection; call once, when started, before SERVING.

    What a service allocates while starting (imports, a loaded model) lives as long as the
    process: rescanning it takes long pauses in the middle of streams.
    """
    gc.collect()
    gc.freeze()


def raise_if_cancelled() -> None:
    """End as cancelled if this task is being cancelled.

    redis-py can lose a cancellation that lands while it writes (turned into a
    ConnectionError, or dropped): a loop that carries on after Redis errors
    would outlive its own cancellation. Such a loop calls this on every turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def woken(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Whether ``event`` was set within ``timeout_s`` (None: no limit).

    ``asyncio.timeout`` tells its own expiry from a cancellation by the task's
    count of cancellations, which a cancellation lost below (see
    ``raise_if_cancelled``) leaves wrong: the next expiry then swallows the
    cancellation for good. ``asyncio.wait`` never cancels its caller.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return bool(done)


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    """Stop background jobs and wait until they have (whatever they raise on the way out).

    A job can lose a cancellation (a library that catches it mid-read; Python 3.11's
    ``wait_for`` when its timeout fires at the same moment) and carry on: it is asked
    again every second.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    await asyncio.gather(*tasks, return_exceptions=True)  # collects what they raised
