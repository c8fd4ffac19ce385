"""The load generator: SSE and gRPC streams, opened first and then requested at once, and what they cost a server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_devstack.http_bench.candidates import CHAT_PATH, GENERATE, INTERVAL_HEADER, MODEL
from sluice_devstack.processes import Process
from sluice_devstack.stack import LOOPBACK


def _cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far, to the nanosecond (``/proc/<pid>/stat`` counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass
class Run:
    cpu_s: float
    client_cpu_s: float
    wall_s: float
    chunks: int
    failed: int


class _SseReader(asyncio.Protocol):
    """Reads one chunked SSE response, counting its events without parsing them (the load generator must stay cheap)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.events = 0
        self.head = b""  # the response's first bytes, for a sample
        self._tail = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if len(self.head) < 700:
            self.head += data[: 700 - len(self.head)]
        # The tail is shorter than the pattern: no event is counted twice.
        window = self._tail + data
        self.events += window.count(b"data: {")
        self._tail = window[-6:]
        if window.endswith(b"\r\n0\r\n\r\n") and not self.done.done():  # the last chunk of the response
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("the connection closed before the response ended"))


def _sse_request(path: str, body: dict[str, Any], interval_ms: float) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{INTERVAL_HEADER}: {interval_ms:g}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def _sse_body(name: str, chunks: int) -> tuple[str, dict[str, Any]]:
    # A token a chunk: max_tokens is the number of content chunks.
    if name == "envoy":
        return GENERATE, {"prompt": "The river", "sampling": {"max_tokens": chunks}}
    messages = [{"role": "user", "content": "The river"}]
    return CHAT_PATH, {"model": MODEL, "messages": messages, "max_tokens": chunks, "stream": True}


async def run_sse(server: Server, streams: int, chunks: int, interval_ms: float) -> tuple[Run, bytes]:
    loop = asyncio.get_running_loop()
    path, body = _sse_body(server.name, chunks)
    request = _sse_request(path, body, interval_ms)
    readers: list[_SseReader] = []
    try:
        for _ in range(streams):
            _, reader = await loop.create_connection(_SseReader, LOOPBACK, server.port)
            readers.append(reader)
        await asyncio.sleep(0.1)  # every connection accepted before the clock starts
        cpu, client, start = _cpu_s(server.pid), time.process_time(), time.perf_counter()
        for reader in readers:
            assert reader.transport is not None
            reader.transport.write(request)
        outcomes = await asyncio.gather(*(r.done for r in readers), return_exceptions=True)
        wall = time.perf_counter() - start
        await asyncio.sleep(0.02)  # what the server does after its last byte counts too
        run = Run(
            cpu_s=_cpu_s(server.pid) - cpu,
            client_cpu_s=time.process_time() - client,
            wall_s=wall,
            # Each response is a role chunk, the content chunks and a finish chunk (Envoy: Started, deltas, Finished).
            chunks=sum(chunks for r, o in zip(readers, outcomes, strict=True) if o is None and r.events == chunks + 2),
            failed=sum(1 for r, o in zip(readers, outcomes, strict=True) if o is not None or r.events != chunks + 2),
        )
        return run, readers[0].head
    finally:
        for reader in readers:
            if reader.transport is not None:
                reader.transport.close()


async def run_grpc(server: Server, channel: grpc.aio.Channel, streams: int, chunks: int, interval_ms: float) -> Run:
    generate = channel.unary_stream(
        GENERATE,
        request_serializer=generation_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generation_pb2.GenerateEvent.FromString,
    )
    request = generation_pb2.GenerateRequest(prompt="The river", sampling=common_pb2.SamplingParams(max_tokens=chunks))
    metadata = ((INTERVAL_HEADER, f"{interval_ms:g}"),)

    async def one() -> int:
        deltas = 0
        async for message in generate(request, metadata=metadata):
            deltas += message.HasField("delta")
        return deltas

    cpu, client, start = _cpu_s(server.pid), time.process_time(), time.perf_counter()
    outcomes = await asyncio.gather(*(one() for _ in range(streams)), return_exceptions=True)
    wall = time.perf_counter() - start
    await asyncio.sleep(0.02)
    return Run(
        cpu_s=_cpu_s(server.pid) - cpu,
        client_cpu_s=time.process_time() - client,
        wall_s=wall,
        chunks=sum(o for o in outcomes if isinstance(o, int) and o == chunks),
        failed=sum(1 for o in outcomes if not (isinstance(o, int) and o == chunks)),
    )


@dataclass
class Server:
    name: str
    port: int
    process: Process

    @property
    def pid(self) -> int:
        return self.process.pid
