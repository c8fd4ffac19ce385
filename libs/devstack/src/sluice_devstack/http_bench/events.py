"""What every server sends: OpenAI's chat chunks, paced on a shared beat or as fast as they go, or relayed from gRPC."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_devstack.http_bench.candidates import DONE, GENERATE, INTERVAL_HEADER, JSON_ENCODER, TOKENS, EventSource


class ChatChunks:
    """One response's ``chat.completion.chunk`` SSE events, each built from a dict and encoded as the front would."""

    def __init__(self, model: str) -> None:
        self._head = {
            "id": f"chatcmpl-{os.urandom(8).hex()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def _chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return f"data: {JSON_ENCODER.encode({**self._head, 'choices': [choice]})}\n\n".encode()

    def role(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self._chunk({"content": text})

    def finish(self, reason: str) -> bytes:
        return self._chunk({}, reason)


class _Beat:
    """A shared clock: every stream waiting on it wakes on the same tick, as a replica's streams send together."""

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._event = asyncio.Event()
        self._streams = 0
        self._next = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def join(self) -> None:
        self._streams += 1
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + self._interval
            self._handle = loop.call_at(self._next, self._tick)

    def leave(self) -> None:
        self._streams -= 1

    async def wait(self) -> None:
        await self._event.wait()

    def _tick(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
        if self._streams <= 0:
            self._handle = None
            return
        loop = asyncio.get_running_loop()
        # A late tick skips the ticks it missed instead of bunching them.
        self._next = max(self._next + self._interval, loop.time())
        self._handle = loop.call_at(self._next, self._tick)


_beats: dict[float, _Beat] = {}


async def paced(n: int, interval_ms: float) -> AsyncIterator[int]:
    """``range(n)``, one number per beat of ``interval_ms``, or one per event-loop turn when it is 0."""
    if interval_ms <= 0:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
        return
    beat = _beats.setdefault(interval_ms, _Beat(interval_ms / 1e3))
    beat.join()
    try:
        for i in range(n):
            await beat.wait()
            yield i
    finally:
        beat.leave()


def interval_from(value: str | None) -> float:
    return float(value) if value else 0.0


async def local_events(body: dict[str, Any], interval_ms: float) -> AsyncIterator[bytes]:
    chunks = ChatChunks(str(body["model"]))
    yield chunks.role()
    async for i in paced(int(body["max_tokens"]), interval_ms):
        yield chunks.content(TOKENS[i % len(TOKENS)])
    yield chunks.finish("length")
    yield DONE


_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


def relayed_events(upstream: str) -> EventSource:
    """Events read from the gRPC server's stream: what the front does with the queue's."""
    # One channel for every stream, as a service keeps one per target.
    channel = grpc.aio.insecure_channel(upstream)
    generate = channel.unary_stream(
        GENERATE,
        request_serializer=generation_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generation_pb2.GenerateEvent.FromString,
    )

    async def events(body: dict[str, Any], interval_ms: float) -> AsyncIterator[bytes]:
        request = generation_pb2.GenerateRequest(
            prompt=str(body["messages"][-1]["content"]),
            sampling=common_pb2.SamplingParams(max_tokens=int(body["max_tokens"])),
        )
        chunks = ChatChunks(str(body["model"]))
        call = generate(request, metadata=((INTERVAL_HEADER, str(interval_ms)),))
        async for message in call:
            event = message
            which = event.WhichOneof("event")
            if which == "delta":
                yield chunks.content(event.delta.text)
            elif which == "started":
                yield chunks.role()
            elif which == "finished":
                yield chunks.finish(_FINISH.get(event.finished.reason, "abort"))
        yield DONE

    return events
