"""The candidate servers, each run as a process of its own (``python -m sluice_devstack.http_bench --serve NAME``)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import grpc
from pydantic import BaseModel

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_devstack.http_bench.candidates import CANDIDATES, CHAT_PATH, INTERVAL_HEADER, MODEL, TOKENS, EventSource
from sluice_devstack.http_bench.events import interval_from, local_events, paced, relayed_events
from sluice_devstack.stack import LOOPBACK


def _listening(port: int) -> socket.socket:
    return socket.create_server((LOOPBACK, port), backlog=4096)


async def _serve_aiohttp(port: int, events: EventSource) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for data in events(body, interval_from(request.headers.get(INTERVAL_HEADER))):
            await response.write(data)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT_PATH, chat)
    # A client that goes away cancels its handler, and with it the upstream call (the engine's request).
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, _listening(port), backlog=4096).start()
    await asyncio.Event().wait()


async def _serve_uvicorn(port: int, events: EventSource, http: Literal["httptools", "h11"]) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        stream = events(body, interval_from(request.headers.get(INTERVAL_HEADER)))
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app = Starlette(routes=[Route(CHAT_PATH, chat, methods=["POST"])])
    config = uvicorn.Config(app, http=http, lifespan="off", access_log=False, log_level="warning", backlog=4096)
    await uvicorn.Server(config).serve(sockets=[_listening(port)])


class _ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    stream: bool = False


async def _serve_fastapi(port: int, events: EventSource) -> None:
    import uvicorn
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    app = FastAPI()

    async def chat(body: _ChatRequest, request: Request) -> StreamingResponse:
        stream = events(body.model_dump(), interval_from(request.headers.get(INTERVAL_HEADER)))
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # FastAPI reads the parameters' types at run time; this module's annotations are strings
    # naming classes imported in this function, which it could not resolve.
    chat.__annotations__ = {"body": _ChatRequest, "request": Request, "return": StreamingResponse}
    app.post(CHAT_PATH)(chat)
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, log_level="warning", backlog=4096)
    await uvicorn.Server(config).serve(sockets=[_listening(port)])


async def _generate(
    request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[generation_pb2.GenerateEvent]:
    metadata = dict(context.invocation_metadata() or ())
    interval_ms = interval_from(cast(str | None, metadata.get(INTERVAL_HEADER)))
    n = request.sampling.max_tokens
    request_id = os.urandom(8).hex()
    yield generation_pb2.GenerateEvent(
        started=generation_pb2.Started(request_id=request_id, model=MODEL, prompt_tokens=8)
    )
    async for i in paced(n, interval_ms):
        yield generation_pb2.GenerateEvent(delta=common_pb2.TokenDelta(text=TOKENS[i % len(TOKENS)], token_ids=[i]))
    yield generation_pb2.GenerateEvent(
        finished=generation_pb2.Finished(
            reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=8, completion_tokens=n),
            request_id=request_id,
        )
    )


async def _serve_grpc(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "sluice.generation.v1.Generation",
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                _generate,
                request_deserializer=generation_pb2.GenerateRequest.FromString,
                response_serializer=generation_pb2.GenerateEvent.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    await server.wait_for_termination()


def serve(name: str, port: int, upstream: str) -> None:
    """Run candidate ``name``'s server on ``port`` until killed (the server processes' entry point)."""
    candidate = CANDIDATES[name]
    events = relayed_events if candidate.relay else (lambda _: local_events)

    async def main() -> None:
        # Inside the loop: a gRPC channel belongs to the loop it was made in.
        if name == "grpc":
            await _serve_grpc(port)
        elif name.startswith(("aiohttp", "relay-aiohttp")):
            await _serve_aiohttp(port, events(upstream))
        elif name == "fastapi":
            await _serve_fastapi(port, events(upstream))
        else:
            await _serve_uvicorn(port, events(upstream), "h11" if name == "uvicorn-h11" else "httptools")

    loop_factory = None
    if candidate.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
