"""A generation's stream from an inference replica, sent to another replica if its own is lost early.

Envoy's least-request balancing picks a dead replica (it has no requests)
until its health checks or outlier detection take it out, within ~2 s; a
generation that lost its replica before any token reached its caller starts
again elsewhere, a few times, pausing a little longer each time. One that
had sent tokens cannot start again: the caller already has them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
from opentelemetry import trace

from sluice.inference.v1 import inference_pb2

# How a replica that died (its process killed, its connection reset) shows in its stream.
_REPLICA_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Times a generation is sent again, and the pause before the first resend (doubling).
_RESENDS = 4
_RESEND_PAUSE_S = 0.1


class InferenceCall(Protocol):
    """One streaming call to inference (a ``grpc.aio.UnaryStreamCall``)."""

    def __aiter__(self) -> AsyncIterator[inference_pb2.GenerateResponse]: ...

    def cancel(self) -> bool: ...


class ReplicaLost(Exception):
    """The replica's stream broke after tokens had reached the caller: it cannot be sent again."""


class ReplicaStream:
    """The call to a replica, and the ones that replace it when a replica is lost before the first token."""

    def __init__(self, start: Callable[[], InferenceCall], delivered: Callable[[], bool]) -> None:
        """``start`` makes the call; ``delivered()`` says whether tokens have reached the caller."""
        self._start = start
        self._delivered = delivered
        self._call = start()

    async def responses(self, span: trace.Span) -> AsyncIterator[inference_pb2.GenerateResponse]:
        resends = 0
        while True:
            try:
                async for response in self._call:
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _REPLICA_LOST:
                    raise  # the replica's own answer: bad input, a full engine, the deadline
                if self._delivered():
                    raise ReplicaLost(f"{exc.code().name}: {exc.details()}") from exc
                if resends == _RESENDS:
                    raise
                # Nothing reached the caller yet: the generation starts again on another replica.
                resends += 1
                span.add_event("replica_lost", {"rpc.grpc.status_code": exc.code().value[0], "resend": resends})
                self._call.cancel()
                await asyncio.sleep(_RESEND_PAUSE_S * 2 ** (resends - 1))
                self._call = self._start()

    def cancel(self) -> None:
        self._call.cancel()
