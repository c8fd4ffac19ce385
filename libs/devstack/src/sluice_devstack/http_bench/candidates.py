"""What ``python -m sluice_devstack.http_bench`` compares: the candidates, and what every one of them streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

CHAT_PATH = "/v1/chat/completions"
GENERATE = "/sluice.generation.v1.Generation/Generate"
# Pacing travels with the request (a header, gRPC metadata through relays and Envoy), so
# that one server process serves both modes.
INTERVAL_HEADER = "x-bench-interval-ms"
MODEL = "sluice-bench"
TOKENS = tuple(f" {w}" for w in "the keeper walks the length of the channel listening to the water".split())
DONE = b"data: [DONE]\n\n"
# One encoder for every chunk: json.dumps with these separators would build a new one per call.
JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))

Kind = Literal["sse", "grpc"]
EventSource = Callable[[dict[str, Any], float], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Candidate:
    kind: Kind
    loop: Literal["asyncio", "uvloop"]
    relay: bool  # its chunks come from the gRPC server (the queue's stand-in)
    what: str


CANDIDATES: dict[str, Candidate] = {
    "aiohttp": Candidate("sse", "asyncio", False, "aiohttp StreamResponse, asyncio loop"),
    "aiohttp-uvloop": Candidate("sse", "uvloop", False, "aiohttp StreamResponse, uvloop"),
    "uvicorn": Candidate("sse", "uvloop", False, "Starlette StreamingResponse on uvicorn, uvloop + httptools"),
    "uvicorn-h11": Candidate("sse", "asyncio", False, "Starlette StreamingResponse on uvicorn, asyncio + h11"),
    "fastapi": Candidate("sse", "uvloop", False, "FastAPI (pydantic body) on uvicorn, uvloop + httptools"),
    "grpc": Candidate("grpc", "asyncio", False, "grpc.aio server stream of GenerateEvent (one gRPC hop)"),
    "relay-aiohttp": Candidate("sse", "asyncio", True, "aiohttp front relaying a gRPC stream, asyncio loop"),
    "relay-aiohttp-uvloop": Candidate("sse", "uvloop", True, "aiohttp front relaying a gRPC stream, uvloop"),
    "relay-uvicorn": Candidate("sse", "uvloop", True, "Starlette/uvicorn front relaying a gRPC stream, uvloop"),
    "envoy": Candidate("sse", "asyncio", True, "Envoy grpc_json_transcoder, SSE-delimited (not OpenAI's shape)"),
}
DEFAULT_CANDIDATES = "aiohttp,uvicorn,grpc,relay-aiohttp,relay-uvicorn,envoy"
