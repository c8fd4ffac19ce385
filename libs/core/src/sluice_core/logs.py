"""Logging set-up: one handler on the root logger, text or JSON, with the trace id."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable

from opentelemetry import trace


class _TraceContextFilter(logging.Filter):
    """Stamps each record with the current trace and span id, so a log line can be matched to a trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = f"{ctx.trace_id:032x}" if ctx.is_valid else ""
        record.span_id = f"{ctx.span_id:016x}" if ctx.is_valid else ""
        return True


class _AbandonedStreamFilter(logging.Filter):
    """Drops OpenTelemetry's "Failed to detach context" traceback for a stream its caller cancelled.

    When a caller cancels a server stream while the handler waits at a
    ``yield``, gRPC's aio server drops the handler's generator without closing
    it; Python closes it later in a task of its own, where the spans opened
    around the ``yield`` (the services' own: ``queue.wait``,
    ``queue.stream``, ``inference.generate``) cannot reset the context they
    set: ValueError, "created in a different Context", logged with a
    traceback once per span and cancelled stream
    (open-telemetry/opentelemetry-python-contrib#2357). The spans still end
    and are exported, and the cancellation has already reached the next hop;
    only these records are dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "opentelemetry.context" or not record.exc_info:
            return True
        error = record.exc_info[1]
        return not (
            isinstance(error, ValueError)
            and "different Context" in str(error)
            and isinstance(error.__context__, GeneratorExit)
        )


class _JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = record.trace_id  # type: ignore[attr-defined]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger for a service process; call once from ``main``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_AbandonedStreamFilter())
    handler.addFilter(_TraceContextFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(service))
    else:
        # The trace id (empty outside a call) finds the call's spans, as in the JSON format.
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s [%(trace_id)s]: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RateLimitedLogger:
    """Warnings at most once per ``interval_s``, each saying how many were left out since the last:
    a fault or a flood of bad requests must not flood the log with a line per request."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at = -math.inf
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        self._log(logging.WARNING, message, args)

    def error(self, message: str, *args: object) -> None:
        self._log(logging.ERROR, message, args)

    def _log(self, level: int, message: str, args: tuple[object, ...]) -> None:
        now = self._clock()
        if now - self._logged_at < self._interval_s:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more like it since the last)"
        self._logger.log(level, message, *args)
        self._logged_at, self._left_out = now, 0
