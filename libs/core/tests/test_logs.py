"""What the services' logs show, and what they leave out."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import trace

from sluice_core.logs import RateLimitedLogger, setup_logging


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """What a service's log handler writes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("test")
    written = io.StringIO()
    assert isinstance(handler := root.handlers[0], logging.StreamHandler)
    handler.setStream(written)
    yield written
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_a_stream_dropped_at_a_yield_logs_no_context_traceback(service_log: io.StringIO) -> None:
    # What gRPC's aio server does to a handler whose caller cancelled while it waited at a yield.
    closed = asyncio.Event()

    async def stream() -> AsyncIterator[int]:
        try:
            with trace.get_tracer(__name__).start_as_current_span("stream"):
                yield 1
                yield 2
        finally:
            closed.set()  # after the span's context was (or failed to be) detached

    dropped: list[AsyncIterator[int]] = []

    async def handler() -> None:
        dropped.append(stream())
        await anext(dropped[0])

    await asyncio.create_task(handler())
    dropped.clear()  # asyncio closes the generator in a task of its own
    await asyncio.wait_for(closed.wait(), 5)
    logging.getLogger("sluice.test").error("a real error")
    written = service_log.getvalue()
    assert "a real error" in written
    assert "Failed to detach context" not in written
    assert "Traceback" not in written


def test_a_rate_limited_logger_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLogger(logging.getLogger("flood"), interval_s=1.0, clock=lambda: now[0])
    for i in range(5):
        log.warning("bad request %d", i)
    now[0] = 1.0
    log.warning("bad request %d", 5)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["bad request 0", "bad request 5 (4 more like it since the last)"]
