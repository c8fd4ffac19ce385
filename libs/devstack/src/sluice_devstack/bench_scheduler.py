"""``sluice bench scheduler``: the queue's scheduler against first come, first served, in the same run.

One local stack (two inference replicas with ``--slots`` each, two queue
replicas) serves both sides:

- **scheduled**: the public API through Envoy's edge listener (Envoy -> queue
  [API key, budget, shared scheduler] -> Envoy -> inference), as a tenant
  whose request and token budgets go through the budget's code as a limited
  tenant's do (reserved ahead, a call per lease, settled locally);
- **fcfs**: ``Inference.Generate`` through Envoy's internal listener, what a
  plain pass-through does: vLLM queues what exceeds its slots, first come
  first served.

Overload, two ways, every fifth request interactive and the rest batch:
*closed loop*, ``4 x capacity`` callers each sending its next request when
its last one ends (requests sent before every caller's first request has
ended measure the start-up burst, not the overload, and are not counted);
*open loop*, requests arriving at 4 x the rate the slower path served in
its closed loop, whether or not earlier ones were answered. Reported: time
to first token p50 / p99 per class. Low load: one caller taking turns, in
a shuffled order each round, on three paths: fcfs, scheduled, and
**queue**, the public API on a queue replica's own port (no edge Envoy, no
edge rate-limit check): queue minus fcfs is what the queue service adds,
scheduled minus queue what the edge adds. The least the queue can add is
its hop and a Redis round trip (``sluice_devstack.floor``), measured two ways: a
do-nothing call to the queue replica and a ``PING``, back to back (the
most favourable pacing), and a stream opened on the queue replica and a
``PING`` taking turns with the three paths (paced like the requests, after
the same idling). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_cli.admin import ensure_tenant_key
from sluice_client import GenerationClient
from sluice_devstack import floor
from sluice_devstack.benchmarks import percentile, prompt, unlimited_edge
from sluice_devstack.stack import LOOPBACK, LocalStack, StackOptions, StackPorts

HELP = "priorities under overload, and the queue's cost at low load"

INTERACTIVE, BATCH = generation_pb2.PRIORITY_INTERACTIVE, generation_pb2.PRIORITY_BATCH
# (priority, seconds to first token)
Sample = tuple[int, float]
Send = Callable[[int, int, int], Coroutine[Any, Any, float]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slots", type=int, default=4, help="slots per inference replica (default %(default)s)")
    parser.add_argument("--overload", type=int, default=4, help="callers per slot (default %(default)s)")
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per path under overload (default %(default)s)"
    )
    parser.add_argument("--output-tokens", type=int, default=64, help="tokens per response (default %(default)s)")
    parser.add_argument(
        "--low-load-requests", type=int, default=200, help="requests per path at low load (default %(default)s)"
    )
    parser.add_argument("--state-dir", type=Path, help="where the stack keeps logs (default: a temporary folder)")


async def first_token_s(events: AsyncIterator[bool]) -> float:
    """Seconds until the stream yields its first True (a token), then drains it."""
    start = time.perf_counter()
    first = 0.0
    async for token in events:
        if token and not first:
            first = time.perf_counter() - start
    return first


def sampling(tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True)


def priority_of(i: int) -> int:
    """Every fifth request is interactive."""
    return INTERACTIVE if i % 5 == 0 else BATCH


async def closed_loop(send: Send, callers: int, requests: int, tokens: int) -> tuple[list[Sample], float]:
    """``callers`` callers, each sending its next request when its last one ends; also the requests/s served.

    ``requests`` are sent beyond the ``callers`` first ones, but those sent during the start-up burst are not counted.
    """
    counter = iter(range(requests + callers))
    samples: list[Sample] = []
    starting = callers  # callers whose first request has not ended yet

    async def caller() -> None:
        nonlocal starting
        for n, i in enumerate(counter):
            # Requests sent while the start-up burst is still served measure the burst.
            counted = not starting
            ttft = await send(i, priority_of(i), tokens)
            if counted:
                samples.append((priority_of(i), ttft))
            if n == 0:
                starting -= 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return samples, (requests + callers) / (time.perf_counter() - start)


async def open_loop(send: Send, rate: float, requests: int, tokens: int) -> list[Sample]:
    """Requests arriving every ``1 / rate`` seconds, whether or not earlier ones were answered."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = []
    for i in range(requests):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        sent.append(asyncio.create_task(send(i, priority_of(i), tokens)))
    return [(priority_of(i), ttft) for i, ttft in enumerate(await asyncio.gather(*sent))]


def summary(samples: list[Sample]) -> dict[str, float]:
    out = {}
    for name, priority in (("interactive", INTERACTIVE), ("batch", BATCH)):
        ttfts = [s * 1e3 for p, s in samples if p == priority]
        out[f"{name}_ttft_p50_ms"] = round(percentile(ttfts, 0.5), 1)
        out[f"{name}_ttft_p99_ms"] = round(percentile(ttfts, 0.99), 1)
    return out


async def budgeted_key(stack: LocalStack) -> str:
    """An API key of tenant "bench", whose budgets are too large to refuse a benchmark's load.

    Unlike the demo tenant (no limits), its requests pay for the budget reservation and refund, as a limited
    tenant's do.
    """
    async with stack.channel(stack.internal) as channel:
        stub = datastore_pb2_grpc.DataStoreStub(channel)
        # Budgets so large they never limit: the budget path runs, and refuses nothing.
        return await ensure_tenant_key(stub, "bench", 10**9, 10**9)


async def run(args: argparse.Namespace) -> int:
    log = sys.stderr
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        options = StackOptions(
            state_dir=state_dir,
            ratelimit_config=unlimited_edge(state_dir),
            ports=StackPorts.free(),
            log_level="WARNING",
            inference_env={
                "SLUICE_INFERENCE_MAX_NUM_SEQS": str(args.slots),
                # The pass-through queues the whole open loop in vLLM, shedding none of it.
                "SLUICE_INFERENCE_MAX_NUM_QUEUED_REQS": str(args.requests),
            },
            # One tenant sends the whole open loop: none of it may be shed (a shed request has no first token).
            queue_env={"SLUICE_QUEUE_MAX_WAITING_PER_TENANT": str(2 * args.requests)},
        )
        stack = LocalStack(options)
        try:
            print("starting the stack ...", file=log, flush=True)
            await stack.start()
            result = await measure(stack, args)
        finally:
            await stack.stop()
    print(json.dumps(result))
    return 0


async def measure(stack: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    log = sys.stderr
    capacity = args.slots * len(stack.ports.inference)
    api_key = await budgeted_key(stack)
    async with (
        GenerationClient(stack.edge, api_key=api_key) as client,
        GenerationClient(f"{LOOPBACK}:{stack.ports.queue[0]}", api_key=api_key) as queue_client,
        stack.channel(stack.internal) as channel,
        stack.channel(f"{LOOPBACK}:{stack.ports.queue[0]}") as queue_channel,
        redis.Redis.from_url(stack.redis_url) as redis_client,
    ):
        inference = inference_pb2_grpc.InferenceStub(channel)
        # What the queue's hop costs with next to no work: the queue path and fcfs both
        # go on from there through Envoy to inference (see ``sluice_devstack.floor``).
        hop, ping = floor.stream_opened(queue_channel), floor.redis_ping(redis_client)

        def public(through: GenerationClient) -> Send:
            async def send(i: int, priority: int, tokens: int) -> float:
                req = generation_pb2.GenerateRequest(prompt=prompt(i, 16), sampling=sampling(tokens), priority=priority)  # type: ignore[arg-type]
                stream = through.generate(req, timeout=600)
                return await first_token_s(e.HasField("delta") async for e in stream)

            return send

        scheduled, queue = public(client), public(queue_client)

        async def fcfs(i: int, priority: int, tokens: int) -> float:
            # No priority: vLLM's default policy serves in arrival order anyway.
            req = inference_pb2.GenerateRequest(prompt=prompt(i, 16), sampling=sampling(tokens))
            call = inference.Generate(req, timeout=600)
            return await first_token_s(r.HasField("delta") async for r in call)

        async def floor_paced(i: int, priority: int, tokens: int) -> float:
            start = time.perf_counter()
            await hop()
            await ping()
            return time.perf_counter() - start

        print(f"low load: one caller, {args.low_load_requests} requests per path ...", file=log, flush=True)
        turns = {"scheduled": scheduled, "queue": queue, "fcfs": fcfs, "floor": floor_paced}
        low: dict[str, list[float]] = {name: [] for name in turns}
        order = random.Random(0)
        for i in range(args.low_load_requests):
            # Taking turns, so that every path sees the same machine, in a new order each
            # round: the work a request leaves behind (its slot's release, its refund, its
            # spans) overlaps the next request's start, and must not always fall on one path.
            for name in order.sample(list(turns), len(turns)):
                low[name].append(await turns[name](i, INTERACTIVE, 8) * 1e3)
        transport = await floor.round_trips_ms({"queue": floor.health_check(queue_channel, api_key), "redis": ping})
        callers = args.overload * capacity
        figures: dict[str, dict[str, dict[str, float]]] = {"closed_loop": {}, "open_loop": {}}
        served: dict[str, float] = {}
        for name, send in (("fcfs", fcfs), ("scheduled", scheduled)):
            print(f"{name}: {callers} callers on {capacity} slots, {args.requests} requests ...", file=log, flush=True)
            samples, served[name] = await closed_loop(send, callers, args.requests, args.output_tokens)
            figures["closed_loop"][name] = summary(samples)
        # The overload factor times what the system serves when saturated. The slower
        # path's rate overloads both paths at least that much; with the faster one's, the
        # interactive fifth alone could exceed what the slower path serves, and that
        # would measure the path's CPU cost, not the order it serves in.
        rate = args.overload * min(served.values())
        for name, send in (("fcfs", fcfs), ("scheduled", scheduled)):
            print(f"{name}: {rate:.0f} requests/s arriving, {args.requests} requests ...", file=log, flush=True)
            figures["open_loop"][name] = summary(await open_loop(send, rate, args.requests, args.output_tokens))
    low_p50 = {name: round(percentile(values, 0.5), 2) for name, values in low.items()}
    paced_floor = low_p50.pop("floor")
    print(
        f"{'load':12} {'path':10} {'interactive p50':>16} {'interactive p99':>16} {'batch p50':>10} {'batch p99':>10}",
        file=log,
    )
    for load, paths in figures.items():
        for name, f in paths.items():
            print(
                f"{load:12} {name:10} {f['interactive_ttft_p50_ms']:>14.1f}ms {f['interactive_ttft_p99_ms']:>14.1f}ms "
                f"{f['batch_ttft_p50_ms']:>8.1f}ms {f['batch_ttft_p99_ms']:>8.1f}ms",
                file=log,
            )
    print(
        f"low load TTFT p50: scheduled {low_p50['scheduled']} ms, queue {low_p50['queue']} ms, "
        f"fcfs {low_p50['fcfs']} ms; the queue's transport floor {transport['total']} ms back to back "
        f"(do-nothing call to a queue replica {transport['queue']} ms + Redis {transport['redis']} ms), "
        f"{paced_floor} ms paced like the requests (a stream opened on the queue replica + Redis)",
        file=log,
    )

    def p99_ratio(load: str) -> float:
        paths = figures[load]
        return round(paths["scheduled"]["interactive_ttft_p99_ms"] / paths["fcfs"]["interactive_ttft_p99_ms"], 3)

    return {
        "capacity": capacity,
        "callers": callers,
        "requests_per_s_served": {name: round(r, 1) for name, r in served.items()},
        "arrivals_per_s": round(rate, 1),
        "overload": figures,
        "low_load_ttft_p50_ms": low_p50,
        "queue_transport_floor_ms": {**transport, "paced_stream": paced_floor},
        "comparison": {
            "closed_loop_interactive_ttft_p99_ratio_scheduled_to_fcfs": p99_ratio("closed_loop"),
            "open_loop_interactive_ttft_p99_ratio_scheduled_to_fcfs": p99_ratio("open_loop"),
            "low_load_ttft_p50_added_by_queue_ms": round(low_p50["queue"] - low_p50["fcfs"], 2),
            "queue_transport_floor_ms": transport["total"],
            "queue_transport_floor_paced_ms": paced_floor,
            "low_load_ttft_p50_added_by_edge_ms": round(low_p50["scheduled"] - low_p50["queue"], 2),
        },
    }
