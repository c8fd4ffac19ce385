"""The HTTP side: OpenAI's routes, each request one call to the Generation API.

A streamed answer's status and headers go out with the call's first event
(its place in the queue, or its start), so that a request the queue refuses
(a bad key, a field out of range, over budget) gets its own HTTP status and
not a 200 with an error inside. After that, an error arrives as a last
``data: {"error": ...}`` event, as vLLM sends it. A client that goes away
cancels its handler (``handler_cancellation``), and with it the call: the
queue aborts the request at the engine.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError
from opentelemetry import propagate, trace

from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_core.channels import LONGEST_DEADLINE_S
from sluice_core.errors import bounded, from_rpc_error
from sluice_core.interceptors import INTERNAL_MESSAGE
from sluice_core.telemetry import TRACE_ID_KEY, current_trace_id
from sluice_openai import responses
from sluice_openai.errors import OpenAIError, from_sluice, invalid
from sluice_openai.requests import Call, Kind, parse
from sluice_openai.settings import OpenAISettings

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Front:
    """OpenAI's API over one channel to the Generation API."""

    def __init__(self, stub: generation_pb2_grpc.GenerationAsyncStub, settings: OpenAISettings) -> None:
        self._stub = stub
        self._settings = settings
        self._models: frozenset[str] = frozenset()
        self._models_until = 0.0
        self.serving = False

    def app(self, callers: frozenset[str] | None) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_body_bytes, middlewares=[_traced, _only(callers)])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.serving else 503, text="serving\n" if self.serving else "draining\n")

    async def _list_models(self, request: web.Request) -> web.Response:
        answer = await self._ask_models(request)
        data = [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "sluice", "max_model_len": m.max_model_len}
            for m in answer.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _ask_models(self, request: web.Request) -> generation_pb2.ListModelsResponse:
        try:
            answer: generation_pb2.ListModelsResponse = await self._stub.ListModels(
                generation_pb2.ListModelsRequest(), metadata=_credentials(request), timeout=10.0
            )
        except grpc.aio.AioRpcError as exc:
            raise from_sluice(from_rpc_error(exc)) from None
        self._models = frozenset(m.id for m in answer.models)
        self._models_until = time.monotonic() + self._settings.models_refresh_s
        return answer

    async def _check_model(self, request: web.Request, model: str) -> None:
        """404 for a model nobody serves; asked with the caller's key, so that only a caller learns names."""
        if not model or (model in self._models and time.monotonic() < self._models_until):
            return
        await self._ask_models(request)
        if model not in self._models:
            shown = bounded(model, 128)  # the caller's text
            raise OpenAIError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        try:
            raw = await request.read()
        except (HttpProcessingError, RequestPayloadError):
            raise invalid("the request body could not be read: its Content-Encoding or length is wrong") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, integers past 4,300 digits, deep nesting
            raise invalid("the request body is not valid JSON") from None
        call = parse(kind, body, request.headers, self._settings.default_max_tokens)
        await self._check_model(request, call.model)
        rpc = self._stub.Generate(call.request, metadata=_credentials(request), timeout=_timeout(request))
        try:
            return await (_stream(request, call, rpc) if call.stream else _whole(call, rpc))
        finally:
            # A client gone away cancels this handler: the queue hears of it at once.
            rpc.cancel()


GenerateCall = grpc.aio.UnaryStreamCall[generation_pb2.GenerateRequest, generation_pb2.GenerateEvent]


async def _whole(call: Call, rpc: GenerateCall) -> web.Response:
    answer = responses.Answer(call)
    texts: list[str] = []
    try:
        async for event in rpc:
            kind = event.WhichOneof("event")
            if kind == "started":
                answer.started(event.started)
            elif kind == "delta":
                texts.append(event.delta.text)
            elif kind == "finished":
                return web.json_response(answer.whole("".join(texts), event.finished))
    except grpc.aio.AioRpcError as exc:
        raise from_sluice(from_rpc_error(exc)) from None
    raise OpenAIError(502, "the generation ended without finishing")


async def _stream(request: web.Request, call: Call, rpc: GenerateCall) -> web.StreamResponse:
    answer = responses.Answer(call)
    response = web.StreamResponse(headers={**SSE_HEADERS, TRACE_ID_KEY: current_trace_id()})
    waited = False

    async def send(events: bytes) -> None:
        nonlocal waited
        await response.write(responses.AFTER_COMMENTS + events if waited else events)
        waited = False

    try:
        async for event in rpc:
            kind = event.WhichOneof("event")
            if not response.prepared:
                await response.prepare(request)
            if kind == "queued":
                await response.write(responses.queued(event.queued.position))
                waited = True
            elif kind == "started":
                answer.started(event.started)
            elif kind == "delta" and event.delta.text:
                # Tokens that end mid-character add no text yet: nothing to tell.
                await send(answer.text_chunk(event.delta.text))
            elif kind == "finished":
                await send(answer.last_chunks(event.finished))
                await response.write_eof()
                return response
    except grpc.aio.AioRpcError as exc:
        error = from_sluice(from_rpc_error(exc))
        if not response.prepared:
            raise error from None
        await send(responses.event(error.body()) + responses.DONE)
        await response.write_eof()
        return response
    except ConnectionResetError:  # the client went away mid-answer: no one to tell
        return response
    raise OpenAIError(502, "the generation ended without finishing")


def _credentials(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The caller's API key, passed on as the queue takes it; Envoy's edge has already refused a second one."""
    key = request.headers.get("x-api-key")
    if key is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    # gRPC metadata is printable ASCII: no key sluice issues is anything else.
    if key and not (key.isascii() and key.isprintable()):
        raise OpenAIError(401, "unknown or revoked API key", code="unauthenticated")
    return (("x-api-key", key),) if key else ()


def _timeout(request: web.Request) -> float | None:
    """The caller's deadline: ``x-sluice-timeout`` in seconds (gRPC's deadline, over HTTP)."""
    header = request.headers.get("x-sluice-timeout")
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise invalid("x-sluice-timeout must be a number of seconds above 0", param="x-sluice-timeout")
    # Further off than a week is no deadline, as for gRPC callers (sluice_core.channels).
    return None if seconds > LONGEST_DEADLINE_S else seconds


@web.middleware
async def _traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A span per request, continuing Envoy's trace, its id in ``x-trace-id``. Health checks, every few
    seconds, are not traced."""
    if request.path == "/health":
        return await _answered(request, handler)
    attributes = {"http.request.method": request.method, "url.path": request.path}
    with _tracer.start_as_current_span(
        f"{request.method} {request.path}",
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
    ) as span:
        response = await _answered(request, handler)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(trace.StatusCode.ERROR)
        if not response.prepared:
            response.headers[TRACE_ID_KEY] = current_trace_id()
        return response


async def _answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal in OpenAI's error JSON, aiohttp's own (404, 405, 413) included."""
    try:
        return await handler(request)
    except OpenAIError as error:
        return error.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return OpenAIError(exc.status, exc.reason).response()
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return OpenAIError(500, INTERNAL_MESSAGE).response()


def _only(callers: frozenset[str] | None) -> Middleware:
    """With TLS, only Envoy (and the operator's tools) may call; the certificate names the caller."""

    @web.middleware
    async def only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if callers is not None and _peer_identity(request) not in callers:
            raise OpenAIError(403, "this port takes only sluice's Envoy")
        return await handler(request)

    return only


def _peer_identity(request: web.Request) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    names = peer.get("subjectAltName", ()) if isinstance(peer, dict) else ()
    return next((value for kind, value in names if kind == "URI"), None)
