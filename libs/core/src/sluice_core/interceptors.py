"""The interceptors of every service: a span per call, errors to statuses, trace id to the caller.

On the server, each call gets a server span that continues the caller's
trace (W3C ``traceparent``: Envoy's span, when the call came through Envoy)
and is the current span while the handler runs, so the handler's own spans and its
calls to other services join the trace. Exceptions a handler raises become
statuses, and the trace id goes back to the caller in trailing metadata
(``x-trace-id``), on success and on error, for looking up a slow or failed
request.

On the client (every channel from ``sluice_core.channels``), each call gets
a client span whose context goes to the server in ``traceparent``; it ends
when the call does, a cancelled stream included.

Tracing is done here rather than by OpenTelemetry's gRPC instrumentation:
that adds a second wrapper around every handler and every streamed message
on the token path (its cost: docs/benchmarks.md). On the server, the span's context is made
current for the call's own task and never reset: gRPC runs each call in a
task of its own, whose context ends with it, so there is nothing to reset it
to, even when a caller cancels a stream while its handler waits at a
``yield``. On the client, the span ends from the call's done callback, not
from a wrapper around its responses: a stream its caller abandons at a
``yield`` still ends its span when it is cancelled, not when the garbage
collector frees the wrapper.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter

from sluice_core import errors
from sluice_core.background import Background
from sluice_core.logs import RateLimitedLogger
from sluice_core.metrics import ended_early
from sluice_core.telemetry import TRACE_ID_KEY, current_trace_id, method_of, traced
from sluice_core.tls import peer_identity

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details under this call's trace id"

UNDECODABLE = Counter("sluice_undecodable_requests", "Request messages that did not parse, by method.", ["method"])
# Any caller can send garbage: a line a second at most, however much of it comes.
_undecodable_log = RateLimitedLogger(logger, interval_s=1.0)

# Codes that are the server's failure, not the caller's: the span is marked as an error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_tracer = trace.get_tracer(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


@contextlib.contextmanager
def _server_span(method: str, context: Context) -> Iterator[None]:
    """The call's span, current for the rest of the call's task, ended when the call ends."""
    carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
    parent = propagate.extract(carrier)
    attributes: dict[str, str | int] = {**_rpc_attributes(method), "rpc.grpc.status_code": 0}
    span = _tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        # The caller went away or its deadline passed: what the caller's status says, not OK.
        code = grpc.StatusCode[ended_early(context.time_remaining()).upper()]
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        raise
    finally:
        span.end()


def _trailing() -> tuple[tuple[str, str], ...]:
    trace_id = current_trace_id()
    return ((TRACE_ID_KEY, trace_id),) if trace_id else ()


def _status_for(exc: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream call failed: pass its status on, details included.
        exc = errors.from_rpc_error(exc)
    if isinstance(exc, errors.SluiceError):
        if exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            logger.error("%s failed: %s", method, exc.message)
        status = errors.to_status(exc)
        return status.code, status.details, tuple(status.trailing_metadata)
    logger.exception("%s failed unexpectedly", method)
    trace.get_current_span().record_exception(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ()


async def _abort(context: Context, exc: Exception, method: str) -> None:
    code, message, metadata = _status_for(exc, method)
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(trace.Status(trace.StatusCode.ERROR, message))
    await context.abort(code, message, metadata + _trailing())


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Traces each call, maps exceptions raised by handlers to statuses and adds ``x-trace-id`` to trailing metadata."""

    def __init__(self, callers: frozenset[str] | None = None) -> None:
        """``callers``: the identities (``sluice_core.tls``) that may call, with TLS; None takes anyone."""
        self._callers = callers
        self._unknown: grpc.RpcMethodHandler[bytes, None] = grpc.unary_unary_rpc_method_handler(
            functools.partial(_unknown_method, callers)
        )
        # Each method's wrapped handler, built at its first call: registered handlers never change.
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                # An unknown method (not kept: any caller can make up names). A caller this port does
                # not take learns nothing from it: which methods exist is theirs to know alone.
                return None if self._callers is None else self._unknown

            wrapped = self._handlers[method] = _wrapped(handler, method, traced(handler_call_details), self._callers)
        return wrapped


def _wrapped(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, with_span: bool, callers: frozenset[str] | None
) -> grpc.RpcMethodHandler[Any, Any]:
    if handler.request_streaming and handler.response_streaming:
        # Sluice has no bidirectional RPCs; leave them (reflection) untouched.
        return handler
    deserializer = _lenient(handler.request_deserializer, method)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, method, with_span, callers, streamed=True),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.response_streaming:
        behavior = handler.unary_stream
        # Some handlers (grpc's health Watch) write with context.write() instead of yielding.
        stream = inspect.isasyncgenfunction(behavior)
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(behavior, method, with_span, callers)
            if stream
            else _wrap_unary(behavior, method, with_span, callers),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        _wrap_unary(handler.unary_unary, method, with_span, callers),
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


class _Undecodable:
    """A request message that did not parse: refused INVALID_ARGUMENT by the handler's wrapper. gRPC
    itself answers UNKNOWN, and logs a traceback for each, which any caller could flood the log with."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message = descriptor.full_name if descriptor is not None else "request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            UNDECODABLE.labels(method).inc()
            _undecodable_log.warning("%s: a request that is not a valid %s", method, message)
            return _Undecodable(message)

    return deserialize


async def _unknown_method(callers: frozenset[str] | None, request: bytes, context: Context) -> None:
    try:
        _admit(context, callers)
    except errors.PermissionDenied as exc:
        await context.abort(exc.code, exc.message)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


def _admit(context: Context, callers: frozenset[str] | None) -> None:
    """Refuse a caller whose identity this port does not take (with TLS, all have one)."""
    if callers is not None and (caller := peer_identity(context)) not in callers:
        raise errors.PermissionDenied(f"{caller or 'a caller without an identity'} may not call this service")


def _parsed(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument.field("request", f"not a valid {request.message}: it does not parse")
    return request


async def _parsed_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parsed(request)


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method[1:].rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _span_of(method: str, context: Context, with_span: bool) -> contextlib.AbstractContextManager[None]:
    return _server_span(method, context) if with_span else contextlib.nullcontext()


def _wrap_unary(
    behavior: Any, method: str, with_span: bool, callers: frozenset[str] | None, streamed: bool = False
) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: Context) -> Any:
        with _span_of(method, context, with_span):
            try:
                _admit(context, callers)
                response = await behavior(_parsed_stream(request) if streamed else _parsed(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)
            context.set_trailing_metadata(_trailing())
            return response

    return unary


def _wrap_stream(
    behavior: Any, method: str, with_span: bool, callers: frozenset[str] | None
) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        with _span_of(method, context, with_span):
            try:
                _admit(context, callers)
                # Closed here, inside the span: when the caller goes away while the handler waits
                # at a yield, gRPC drops this generator, and the handler's own clean-up (the
                # outcome it records on the span) must run before the span ends, not whenever
                # the garbage collector gets to it.
                async with contextlib.aclosing(behavior(_parsed(request), context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)
            context.set_trailing_metadata(_trailing())

    return stream


class _UnaryUnaryTracing(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await _client_call(continuation, client_call_details, request)


class _UnaryStreamTracing(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await _client_call(continuation, client_call_details, request)


class _StreamUnaryTracing(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await _client_call(continuation, client_call_details, request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per call, a child of the current span, sent on to the server as ``traceparent``.

    One interceptor per kind of call: a channel files an interceptor under the
    first kind it implements only.
    """
    return [_UnaryUnaryTracing(), _UnaryStreamTracing(), _StreamUnaryTracing()]


# Spans waiting for their call's status.
_ending = Background("ending a client span")


async def _client_call(continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
    if not traced(details):
        return await continuation(details, request)
    name = method_of(details)
    span = _tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=_rpc_attributes(name))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    # The caller's own traceparent (sluice_client sends one) gives way to this span's, its child.
    metadata = grpc.aio.Metadata(*((k, v) for k, v in details.metadata or () if k not in carrier), *carrier.items())
    try:
        call = await continuation(details._replace(metadata=metadata), request)  # type: ignore[attr-defined]
    except BaseException:
        span.end()
        raise
    call.add_done_callback(functools.partial(_call_done, span))
    return call


def _call_done(span: trace.Span, call: grpc.aio.Call) -> None:
    # The status is only to be had by awaiting it; the span ends as of now all the same.
    _ending.spawn(_end_client_span(span, call, time.time_ns()))


async def _end_client_span(span: trace.Span, call: grpc.aio.Call, end_ns: int) -> None:
    code = await call.code()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {await call.details()}"))
    span.end(end_time=end_ns)
