"""A typed client for ``sluice.generation.v1.Generation``.

Failed calls raise ``StreamError``: the server's error class (``InvalidArgument``
with its field violations, ``ResourceExhausted`` with its retry hint, ...) and
the trace id to look the request up with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import grpc

from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_core.channels import insecure_channel
from sluice_core.errors import SluiceError, from_rpc_error
from sluice_core.telemetry import TRACE_ID_KEY


class StreamError(Exception):
    """A generation that failed: ``error`` is what the server raised."""

    def __init__(self, error: SluiceError, code: grpc.StatusCode, trace_id: str) -> None:
        super().__init__(f"{code.name}: {error.message}")
        self.error = error
        self.code = code
        self.trace_id = trace_id


def _trace_id(metadata: grpc.aio.Metadata | None) -> str:
    for key, value in metadata or ():
        if key == TRACE_ID_KEY:
            return value if isinstance(value, str) else value.decode()
    return ""


class GenerationStream:
    """One call's events, in order; ``trace_id`` is known once the stream has ended."""

    def __init__(self, call: grpc.aio.UnaryStreamCall[generation_pb2.GenerateRequest, generation_pb2.GenerateEvent]):
        self._call = call
        self.trace_id = ""

    async def __aiter__(self) -> AsyncIterator[generation_pb2.GenerateEvent]:
        try:
            async for event in self._call:
                yield event
        except grpc.aio.AioRpcError as exc:
            self.trace_id = _trace_id(exc.trailing_metadata())
            raise StreamError(from_rpc_error(exc), exc.code(), self.trace_id) from None
        self.trace_id = _trace_id(await self._call.trailing_metadata())

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
        return GenerationStream(self._stub.Generate(request, timeout=timeout, metadata=self._metadata))

    async def create_conversation(self, timeout: float | None = None) -> str:  # noqa: ASYNC109 - a gRPC deadline
        """A new conversation of this key's tenant; pass its id as ``conversation_id``."""
        call = self._stub.CreateConversation(
            generation_pb2.CreateConversationRequest(), timeout=timeout, metadata=self._metadata
        )
        try:
            return str((await call).id)
        except grpc.aio.AioRpcError as exc:
            raise StreamError(from_rpc_error(exc), exc.code(), _trace_id(exc.trailing_metadata())) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
