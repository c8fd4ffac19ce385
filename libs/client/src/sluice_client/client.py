"""A typed client for ``sluice.generation.v1.Generation``.

Failed calls raise ``StreamError``: the server's error class (``InvalidArgument``
with its field violations, ``ResourceExhausted`` with its retry hint, ...) and
the trace id to look the request up with.

Each call starts its own trace (a W3C ``traceparent``, unless the caller's
OpenTelemetry already sends one): its id is known whatever the outcome, a
deadline that passes or an Envoy refusal included, which never bring the
server's trailing metadata.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Self

import grpc
from opentelemetry import context, trace

from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_core.channels import LONGEST_DEADLINE_S, insecure_channel
from sluice_core.errors import SluiceError, Unavailable, from_rpc_error
from sluice_core.telemetry import TRACE_ID_KEY

# gRPC's status for a stream the other end (Envoy) reset: RST_STREAM carries no status of its own.
_RESET = "Stream removed"


class StreamError(Exception):
    """A generation that failed: ``error`` is what the server raised."""

    def __init__(self, error: SluiceError, code: grpc.StatusCode, trace_id: str) -> None:
        super().__init__(f"{code.name}: {error.message}")
        self.error = error
        self.code = code
        self.trace_id = trace_id


def _trace_id(metadata: grpc.aio.Metadata | None, started: str) -> str:
    for key, value in metadata or ():
        if key == TRACE_ID_KEY:
            return value if isinstance(value, str) else value.decode()
    return started


@contextlib.contextmanager
def _new_trace() -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
    """A new sampled trace's id and its ``traceparent``, current while the call is made.

    Current as well as sent: where the caller's process records spans, the
    channel's tracing interceptor (``sluice_core.interceptors``) replaces the
    header with its own span's, a child of the current one, in the same trace.
    A caller already in a span of its own keeps it (its trace id comes back in
    the trailing metadata).
    """
    if trace.get_current_span().get_span_context().is_valid:
        yield "", ()
        return
    trace_id, span_id = secrets.randbits(128) or 1, secrets.randbits(64) or 1
    started = trace.SpanContext(
        trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(started)))
    try:
        yield f"{trace_id:032x}", (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01"),)
    finally:
        context.detach(token)


class GenerationStream:
    """One call's events, in order; ``trace_id`` is its trace's (from the start, unless the caller's span leads)."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[generation_pb2.GenerateRequest, generation_pb2.GenerateEvent],
        trace_id: str = "",
    ):
        self._call = call
        self.trace_id = trace_id

    async def __aiter__(self) -> AsyncIterator[generation_pb2.GenerateEvent]:
        received = 0
        try:
            async for event in self._call:
                received += 1
                yield event
        except grpc.aio.AioRpcError as exc:
            self.trace_id = _trace_id(exc.trailing_metadata(), self.trace_id)
            if exc.code() == grpc.StatusCode.INTERNAL and (exc.details() or "").startswith(_RESET):
                # A reset, not a server's INTERNAL: the queue replica (or a hop) went away mid-stream, and
                # Envoy cannot send a status once the answer has begun. Worth a retry, unlike INTERNAL.
                lost = Unavailable(f"the stream was cut off after {received} events (a server went away); retry")
                raise StreamError(lost, lost.code, self.trace_id) from None
            raise StreamError(from_rpc_error(exc), exc.code(), self.trace_id) from None
        self.trace_id = _trace_id(await self._call.trailing_metadata(), self.trace_id)

    def cancel(self) -> None:
        """Stop the generation (the server aborts it in the engine)."""
        self._call.cancel()


class GenerationClient:
    """``async with GenerationClient("127.0.0.1:8080") as client: ...``"""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self._channel = insecure_channel(target)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._metadata = (("x-api-key", api_key),) if api_key else ()

    def generate(self, request: generation_pb2.GenerateRequest, timeout: float | None = None) -> GenerationStream:
        if timeout is not None and timeout > LONGEST_DEADLINE_S:
            timeout = None
        with _new_trace() as (trace_id, traceparent):
            call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata + traceparent)
        return GenerationStream(call, trace_id)

    async def create_conversation(self, timeout: float | None = None) -> str:  # noqa: ASYNC109 - a gRPC deadline
        """A new conversation of this key's tenant; pass its id as ``conversation_id``."""
        call = self._stub.CreateConversation(
            generation_pb2.CreateConversationRequest(), timeout=timeout, metadata=self._metadata
        )
        try:
            return str((await call).id)
        except grpc.aio.AioRpcError as exc:
            raise StreamError(from_rpc_error(exc), exc.code(), _trace_id(exc.trailing_metadata(), "")) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
