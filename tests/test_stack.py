"""End to end through Envoy: public API -> queue -> Envoy -> two inference replicas, and back.

The tests share one stack (its replicas on the simulated engine) and run in
file order: the first ones look at the stack as it was when it said ready.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys

import grpc
import pytest

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_cli.spans import Span
from sluice_client import GenerationClient, StreamError
from sluice_core.errors import InvalidArgument
from sluice_devstack import floor
from sluice_devstack.stack import LOOPBACK, LocalStack
from sluice_devstack.waiting import eventually

from .conftest import LIMITED_KEY, LIMITED_PER_HOUR, RATE_LIMITS, requests_served, scraped

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def request(max_tokens: int = 16, prompt: str = "The river", **sampling: object) -> generation_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    return generation_pb2.GenerateRequest(prompt=prompt, sampling=params)


async def events(
    stack: LocalStack, req: generation_pb2.GenerateRequest
) -> tuple[list[generation_pb2.GenerateEvent], str]:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        stream = client.generate(req, timeout=60)
        received = [event async for event in stream]
    return received, stream.trace_id


async def idle(stack: LocalStack, index: int) -> bool:
    async with stack.channel(stack.inference_address(index)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        load = await stub.GetLoad(inference_pb2.GetLoadRequest())
    return bool(load.running == 0 and load.waiting == 0)


async def test_ready_means_envoy_has_routed_a_request_to_every_queue_replica(stack: LocalStack) -> None:
    # Else the first user request routed to the other one opens Envoy's connection to it.
    assert await stack.unvisited_queues() == 0


async def test_tokens_stream_through_the_stack(stack: LocalStack) -> None:
    received, trace_id = await events(stack, request(max_tokens=32))
    kinds = [event.WhichOneof("event") for event in received]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds.count("delta") >= 2, "tokens must arrive as they are generated"
    finished = received[-1].finished
    assert finished.usage.completion_tokens == 32 == sum(len(e.delta.token_ids) for e in received)
    assert finished.reason == common_pb2.FINISH_REASON_LENGTH
    assert finished.request_id == received[0].started.request_id
    assert 0 < finished.timings.time_to_first_token_ms <= finished.timings.total_ms
    assert len(trace_id) == 32


async def test_requests_spread_over_both_replicas(stack: LocalStack) -> None:
    before = [requests_served(stack, i) for i in (0, 1)]
    await asyncio.gather(*(events(stack, request(max_tokens=24)) for _ in range(16)))
    after = [requests_served(stack, i) for i in (0, 1)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 16
    assert min(served) >= 3, f"least-request balancing should use both replicas: {served}"


async def test_cancelling_mid_stream_frees_both_replicas(stack: LocalStack) -> None:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        streams = [client.generate(request(max_tokens=1500), timeout=60) for _ in range(4)]
        for stream in streams:
            async for event in stream:
                if event.HasField("delta"):
                    break
        for stream in streams:
            stream.cancel()

        async def both_idle() -> bool:
            return all([await idle(stack, 0), await idle(stack, 1)])

        assert await eventually(both_idle, 1.0, "both replicas back to 0 running") < 1.0

    # A trace reader sees each of them ended by its caller, at the queue and at the replica.
    cancelled = {"/sluice.generation.v1.Generation/Generate": "cancelled", "inference.generate": "cancelled"}

    async def told(trace_id: str) -> bool:
        spans = stack.spans(trace_id)
        return {s.name: s.attributes.get("sluice.outcome") for s in spans if s.name in cancelled} == cancelled

    for stream in streams:
        await eventually(functools.partial(told, stream.trace_id), 15, f"spans of {stream.trace_id} say cancelled")


async def test_an_expired_deadline_is_deadline_exceeded(stack: LocalStack) -> None:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        with pytest.raises(StreamError) as caught:
            async for _ in client.generate(request(max_tokens=1500), timeout=0.5):
                pass
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # No trailing metadata comes back from a call whose deadline passed: the client's own trace id does.
    trace_id = caught.value.trace_id

    # ... and the trace, like the metrics, says the deadline ended it, at the queue and at the replica.
    spans_of_the_request = ("/sluice.generation.v1.Generation/Generate", "inference.generate")
    expired = dict.fromkeys(spans_of_the_request, "deadline_exceeded")

    async def traced() -> bool:
        spans = stack.spans(trace_id)
        return {s.name: s.attributes.get("sluice.outcome") for s in spans if s.name in expired} == expired

    await eventually(traced, 15, f"the queue's and the replica's spans of the expired call, in trace {trace_id!r}")

    async def both_idle() -> bool:
        return all([await idle(stack, 0), await idle(stack, 1)])

    await eventually(both_idle, 1.0, "the expired request no longer runs")


async def test_bad_input_comes_back_with_the_field(stack: LocalStack) -> None:
    with pytest.raises(StreamError) as caught:
        await events(stack, request(prompt="river " * 3000))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(caught.value.error, InvalidArgument)
    assert caught.value.error.violations[0].field == "prompt"
    assert len(caught.value.trace_id) == 32


async def test_one_trace_holds_envoy_queue_and_inference(stack: LocalStack) -> None:
    _, trace_id = await events(stack, request(max_tokens=8))
    wanted = {"sluice-envoy", "sluice-queue", "sluice-inference"}

    def roots(spans: list[Span]) -> list[Span]:
        ids = {s.span_id for s in spans}
        return [s for s in spans if s.parent_id not in ids]

    async def complete() -> bool:
        # Each process exports on its own schedule; the tree is whole when
        # every hop hangs under one span, Envoy's first.
        spans = stack.spans(trace_id)
        found = roots(spans)
        return (
            {s.service for s in spans} >= wanted
            and any(s.name == "inference.generate" for s in spans)
            and len(found) == 1
            and found[0].service == "sluice-envoy"
        )

    await eventually(complete, 15, f"one tree of spans of {trace_id} from {wanted}, under Envoy's")
    spans = stack.spans(trace_id)
    (engine,) = [s for s in spans if s.name == "inference.generate"]
    assert engine.attributes["gen_ai.usage.completion_tokens"] == 8
    (queue,) = [s for s in spans if s.name == "/sluice.generation.v1.Generation/Generate"]
    assert queue.attributes["sluice.outcome"] == "length"


def test_the_cli_streams_and_summarizes(stack: LocalStack) -> None:
    sluice = [sys.executable, "-m", "sluice_cli", "generate", "--target", stack.edge, "--api-key", stack.demo_api_key]
    ok = subprocess.run([*sluice, "The river", "--max-tokens", "8", "--ignore-eos"],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    summary = ok.stderr.strip().splitlines()[-1]
    assert all(key in summary for key in ("ttft_ms=", "tokens_per_s=", "tokens=8", "trace_id="))
    assert ok.stdout.strip()
    bad = subprocess.run([*sluice, "x", "--max-tokens", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "INVALID_ARGUMENT" in bad.stderr and "max_tokens" in bad.stderr


# Configurations the rate-limit service loaded.
LOADED = r'sluice_ratelimit_config_loads_total\{result="ok"\}'


async def test_envoy_refuses_calls_over_the_rate_limit(stack: LocalStack) -> None:
    # A real tenant's key, limited by a rate-limit file rewritten while the stack runs (hot reload).
    async with stack.channel(stack.internal) as channel:
        stub = datastore_pb2_grpc.DataStoreStub(channel)
        tenant = await stub.CreateTenant(
            datastore_pb2.CreateTenantRequest(name="limited", tier=datastore_pb2.TIER_FREE)
        )
        key = (await stub.IssueApiKey(datastore_pb2.IssueApiKeyRequest(tenant_id=tenant.id))).api_key
    (config,) = stack.options.ratelimit_config
    loads = scraped(stack.ports.ratelimit_metrics, LOADED)
    config.write_text(RATE_LIMITS.replace(LIMITED_KEY, key))
    await eventually(
        lambda: scraped(stack.ports.ratelimit_metrics, LOADED) > loads, 5, "the rate-limit service loads the new file"
    )
    outcomes = []
    message = ""
    async with GenerationClient(stack.edge, api_key=key) as client:
        for _ in range(LIMITED_PER_HOUR + 2):
            try:
                async for _ in client.generate(request(max_tokens=1), timeout=30):
                    pass
                outcomes.append("OK")
            except StreamError as exc:
                outcomes.append(exc.code.name)
                message = exc.error.message
    assert outcomes == ["OK"] * LIMITED_PER_HOUR + ["RESOURCE_EXHAUSTED"] * 2
    assert message.startswith(f"over the rate limit of {LIMITED_PER_HOUR} per hour; retry in ")
    # The same key as "authorization: Bearer" counts against the same limit.
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            request(max_tokens=1), metadata=(("authorization", f"Bearer {key}"),), timeout=30
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.value.details() or "").startswith("over the rate limit")
    # Other callers are not affected.
    received, _ = await events(stack, request(max_tokens=1))
    assert received[-1].HasField("finished")


def test_admin_manages_tenants_and_keys_through_envoy(stack: LocalStack) -> None:
    sluice = [sys.executable, "-m", "sluice_cli", "admin", "--target", stack.internal, "--tls-dir", str(stack.tls_dir)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*sluice, *args], capture_output=True, text=True, timeout=60)

    created = run("create-tenant", "e2e-tenant", "--tier", "premium", "--weight", "3")
    assert created.returncode == 0, created.stderr
    assert run("create-tenant", "e2e-tenant").returncode != 0  # names are unique
    issued = run("issue-key", "e2e-tenant")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.split("api key (shown once): ")[1].split()[0]

    async def tenant_name() -> str:
        async with stack.channel(stack.internal) as channel:
            stub = datastore_pb2_grpc.DataStoreStub(channel)
            return str((await stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=key))).name)

    assert asyncio.run(tenant_name()) == "e2e-tenant"
    listed = run("list-tenants")
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith("e2e-tenant\t")]
    assert "premium\tweight 3" in line
    key_id = issued.stdout.split("key id: ")[1].split()[0]
    assert run("list-keys", "e2e-tenant").stdout.startswith(f"{key_id}\tcreated ")
    assert run("revoke-key", key).returncode == 0
    assert "\trevoked " in run("list-keys", "e2e-tenant").stdout
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(tenant_name())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_demo_key_is_kept_across_restarts_until_it_stops_working(stack: LocalStack) -> None:
    key = stack.demo_api_key
    assert (stack.options.state_dir / "demo-api-key").read_text().strip() == key
    assert await stack.demo_key() == key, "a restart keeps the key scripts were given"
    async with stack.channel(stack.internal) as channel:
        stub = datastore_pb2_grpc.DataStoreStub(channel)
        assert (await stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=key))).name == "demo"
        await stub.RevokeApiKey(datastore_pb2.RevokeApiKeyRequest(api_key=key))
        renewed = await stack.demo_key()
        assert renewed != key
        assert (await stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=renewed))).name == "demo"
    assert (stack.options.state_dir / "demo-api-key").read_text().strip() == renewed


async def test_the_transport_floor_crosses_the_hops_it_names(stack: LocalStack) -> None:
    # `sluice bench` sets the stack's added time to first token against these round trips.
    trips = await floor.transport(stack)
    assert set(trips) == {"edge", "inference", "redis", "total"}
    assert all(trip > 0 for trip in trips.values())
    # Envoy, its rate-limit call and a Python server cannot answer as fast as Redis alone.
    assert trips["edge"] > trips["redis"]
    assert trips["total"] == pytest.approx(trips["edge"] + trips["inference"] + trips["redis"], abs=0.02)
    # `sluice bench scheduler`'s paced floor: a stream opened on a queue replica, its first message read.
    async with stack.channel(f"{LOOPBACK}:{stack.ports.queue[0]}") as queue:
        opened = await floor.round_trips_ms({"stream": floor.stream_opened(queue)}, rounds=5)
    assert opened["stream"] > 0
