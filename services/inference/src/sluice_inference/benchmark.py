"""``sluice bench``: the whole stack against the bare engine, in the same run.

The local stack is started on free ports and measured through Envoy's edge
listener (Envoy -> queue -> Envoy -> inference) with the demo tenant's key,
as a user right after ``sluice up`` (the readiness check has used that key;
the tenant has no budgets to check); then an in-process vLLM
``AsyncLLM`` with a replica's engine settings is measured directly. The
stack goes first so that its client runs in a process without vLLM (whose
heap would make the client's own garbage collection pauses part of the
figures).
Each phase runs the same prompts at each concurrency. Metrics follow
``vllm bench serve``: time to first token (request sent -> first token
received), time per output token ((latency - TTFT) / (tokens - 1), per
request) and output tokens/s over the phase's wall time. Before the stack
stops, do-nothing calls over the same hops (``sluice_devstack.floor``) measure
the least the stack can add to time to first token. The last line is one
JSON object with every figure and the ratios the targets are about.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_client import GenerationClient
from sluice_core.sampling import Sampling
from sluice_devstack import floor
from sluice_devstack.benchmarks import percentile, prompt, unlimited_edge
from sluice_devstack.stack import LocalStack, StackOptions, StackPorts, cpu_engine_env, replica_cpus
from sluice_inference import tiny_model
from sluice_inference.settings import DEFAULT_TINY_MODEL_DIR, InferenceSettings

HELP = "the whole stack against the bare engine"

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

# A request yields (seconds to first token, seconds to last token, output tokens).
Timing = tuple[float, float, int]
RunOne = Callable[[int], Awaitable[Timing]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", default="1,16", help="concurrencies to measure (default %(default)s)")
    parser.add_argument("--prompt-words", type=int, default=48, help="prompt length in words (default %(default)s)")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens per response (default %(default)s)")
    parser.add_argument(
        "--requests",
        type=int,
        default=48,
        help="requests per concurrency, at least 8 per stream (default %(default)s)",
    )
    parser.add_argument("--state-dir", type=Path, help="where the stack keeps logs (default: a temporary folder)")


@dataclass(frozen=True)
class Figures:
    streams: int
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    output_tokens_per_s: float


async def measure(run_one: RunOne, streams: int, requests: int) -> Figures:
    requests = max(requests, 8 * streams)
    counter = iter(range(requests))
    timings: list[Timing] = []

    async def worker() -> None:
        for i in counter:
            timings.append(await run_one(i))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - start
    ttfts = [t[0] * 1e3 for t in timings]
    tpots = [(last - first) * 1e3 / (n - 1) for first, last, n in timings if n > 1]
    return Figures(
        streams=streams,
        requests=len(timings),
        ttft_p50_ms=round(percentile(ttfts, 0.5), 2),
        ttft_p99_ms=round(percentile(ttfts, 0.99), 2),
        tpot_p50_ms=round(percentile(tpots, 0.5), 3),
        output_tokens_per_s=round(sum(t[2] for t in timings) / wall, 1),
    )


async def timed(events: AsyncIterator[int]) -> Timing:
    """Time a stream of token counts, one per chunk received."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async for n in events:
        if n:
            now = time.perf_counter()
            first = first or now - start
            last = now - start
            tokens += n
    return first, last, tokens


async def bench_direct(args: argparse.Namespace, concurrencies: list[int]) -> dict[int, Figures]:
    # vLLM logs to stdout by default; stdout is for the result line. Set before vLLM is imported.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from sluice_inference import vllm_engine  # imports vLLM: only when benchmarking
    from sluice_inference.load import Load

    # The same engine as one replica of the stack (one replica's CPU share of threads).
    os.environ.update(cpu_engine_env(len(replica_cpus(0, 2))))
    settings = InferenceSettings()
    model_dir = settings.model or str(await asyncio.to_thread(tiny_model.ensure, DEFAULT_TINY_MODEL_DIR))
    engine = await asyncio.to_thread(vllm_engine.build, settings, model_dir, Load())
    try:
        await engine.warm_up()
        params = vllm_engine.sampling_params(Sampling(max_tokens=args.output_tokens, ignore_eos=True))
        return {n: await measure(engine_run(engine.llm, params, args), n, args.requests) for n in concurrencies}
    finally:
        await engine.shutdown()
        # Freed now: an engine left to the interpreter's exit runs its finalizer
        # after vLLM's modules are gone, and prints a traceback.
        del engine


def engine_run(engine: AsyncLLM, params: SamplingParams, args: argparse.Namespace) -> RunOne:
    async def chunks(i: int) -> AsyncIterator[int]:
        async for output in engine.generate(prompt(i, args.prompt_words), params, request_id=f"bench-{time.time_ns()}"):
            yield len(output.outputs[0].token_ids)

    async def run_one(i: int) -> Timing:
        return await timed(chunks(i))

    return run_one


def public_request(i: int, args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    return generation_pb2.GenerateRequest(prompt=prompt(i, args.prompt_words), sampling=sampling)


async def bench_stack(args: argparse.Namespace, concurrencies: list[int], state_dir: Path) -> dict[str, Any]:
    options = StackOptions(
        state_dir=state_dir, ports=StackPorts.free(), log_level="WARNING", ratelimit_config=unlimited_edge(state_dir)
    )
    stack = LocalStack(options)
    try:
        await stack.start()
        async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:

            async def chunks(i: int) -> AsyncIterator[int]:
                async for event in client.generate(public_request(i, args), timeout=300):
                    yield len(event.delta.token_ids) if event.HasField("delta") else 0

            async def run_one(i: int) -> Timing:
                return await timed(chunks(i))

            # Straight after the stack reports ready: is the first request as fast as later ones?
            first_ten = [(await run_one(10_000 + i))[0] * 1e3 for i in range(10)]
            figures = {n: await measure(run_one, n, args.requests) for n in concurrencies}
            transport = await floor.transport(stack)
        return {"first_ten_ttft_ms": [round(t, 2) for t in first_ten], "figures": figures, "floor": transport}
    finally:
        await stack.stop()


async def run(args: argparse.Namespace) -> int:
    concurrencies = [int(n) for n in args.streams.split(",")]
    log = sys.stderr
    print("whole stack (Envoy -> queue -> Envoy -> 2 inference replicas) ...", file=log, flush=True)
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        stack = await bench_stack(args, concurrencies, args.state_dir or Path(tmp))
    print(f"direct engine: {concurrencies} streams ...", file=log, flush=True)
    direct = await bench_direct(args, concurrencies)
    through: dict[int, Figures] = stack["figures"]
    first_ten: list[float] = stack["first_ten_ttft_ms"]
    transport: dict[str, float] = stack["floor"]

    print(f"{'path':8} {'streams':>7} {'TTFT p50':>10} {'TTFT p99':>10} {'TPOT p50':>10} {'tokens/s':>10}", file=log)
    for name, figures in (("direct", direct), ("stack", through)):
        for f in figures.values():
            print(
                f"{name:8} {f.streams:>7} {f.ttft_p50_ms:>8.2f}ms {f.ttft_p99_ms:>8.2f}ms "
                f"{f.tpot_p50_ms:>8.3f}ms {f.output_tokens_per_s:>10.1f}",
                file=log,
            )
    low, high = min(concurrencies), max(concurrencies)
    added = through[low].ttft_p50_ms - direct[low].ttft_p50_ms
    print(
        f"transport floor (do-nothing round trips, p50): edge {transport['edge']} ms + inference hop "
        f"{transport['inference']} ms + Redis {transport['redis']} ms = {transport['total']} ms, "
        f"against {added:.2f} ms added at {low} stream",
        file=log,
    )
    comparison = {
        f"ttft_p50_added_ms_at_{low}_stream": round(added, 2),
        "transport_floor_ms": transport["total"],
        f"tokens_per_s_ratio_at_{high}_streams": round(
            through[high].output_tokens_per_s / direct[high].output_tokens_per_s, 3
        ),
        "first_to_tenth_ttft_ratio": round(first_ten[0] / first_ten[9], 3),
        # One sample against one sample is mostly noise here; the next nine's median is steadier.
        "first_to_median_of_next_nine_ratio": round(first_ten[0] / statistics.median(first_ten[1:]), 3),
    }
    result = {
        "settings": {
            "prompt_words": args.prompt_words,
            "output_tokens": args.output_tokens,
            "requests_per_concurrency": args.requests,
        },
        "direct": {n: asdict(f) for n, f in direct.items()},
        "stack": {n: asdict(f) for n, f in through.items()},
        "stack_first_ten_ttft_ms": first_ten,
        "transport_floor_ms": transport,
        "comparison": comparison,
    }
    print(json.dumps(result))
    return 0
