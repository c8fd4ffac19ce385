"""The one server interceptor every service installs: errors to statuses, trace id to the caller.

It runs inside the OpenTelemetry server interceptor, so the current span is
the request's server span: its trace id goes back to the caller in trailing
metadata (``x-trace-id``), on success and on error, for looking up a slow or
failed request.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from sluice_core import errors
from sluice_core.telemetry import TRACE_ID_KEY, current_trace_id

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details under this call's trace id"


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


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    code, message, metadata = _status_for(exc, method)
    trace.get_current_span().set_attribute("rpc.grpc.status_code", code.value[0])
    await context.abort(code, message, metadata + _trailing())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by handlers to statuses and adds ``x-trace-id`` to trailing metadata."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or (handler.request_streaming and handler.response_streaming):
            # Sluice has no bidirectional RPCs; leave them (and unknown methods) untouched.
            return handler
        method = handler_call_details.method
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming:
            behavior = handler.unary_stream
            # Some handlers (grpc's health Watch) write with context.write() instead of yielding.
            stream = inspect.isasyncgenfunction(behavior)
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(behavior, method) if stream else _wrap_unary(behavior, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _wrap_unary(behavior: Any, method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            response = await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)
        context.set_trailing_metadata(_trailing())
        return response

    return unary


def _wrap_stream(behavior: Any, method: str) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)
        context.set_trailing_metadata(_trailing())

    return stream
