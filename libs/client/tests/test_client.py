"""The client's stream: a caller that stops reading stops the generation."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

from sluice.generation.v1 import generation_pb2
from sluice_client import GenerationStream


class Call:
    """Stands in for a gRPC server-streaming call: endless deltas, and whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[generation_pb2.GenerateEvent]:
        while not self.cancelled:
            yield generation_pb2.GenerateEvent(delta=generation_pb2.GenerateEvent().delta)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_breaking_out_of_a_stream_cancels_its_call() -> None:
    call = Call()
    async for _ in GenerationStream(call):  # type: ignore[arg-type]
        break
    gc.collect()
    # The loop closes an abandoned async generator in a task of its own.
    for _ in range(3):
        await asyncio.sleep(0)
    assert call.cancelled
