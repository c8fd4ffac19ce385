"""Faults injected into a running stack under streaming load: what callers see, and what is billed.

The stack runs on the simulated engine with a slow prefill (4 ms a prompt
token), so that a long prompt leaves a window in which a request has a
replica but no token yet, and is supervised as ``sluice up`` runs it: what a
fault kills is started again, and each test waits until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_client import GenerationClient, StreamError
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.processes import Process
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LocalStack, free_ports
from sluice_devstack.waiting import eventually

from .conftest import LIMITED_KEY, LIMITED_PER_HOUR, stack_options, tenant_with_key

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PREFILL_MS_PER_TOKEN = 4
DRAFT_INTERVAL_S = 1.0  # the queue's default USAGE_DRAFT_INTERVAL_S
REDIS_STALL_S = 10.0


@dataclass
class Supervised:
    stack: LocalStack
    redis: RedisServer
    postgres: PostgresServer
    restarts: list[str] = field(default_factory=list)
    supervising: asyncio.Task[None] | None = None

    def supervise(self) -> None:
        self.supervising = asyncio.create_task(self.stack.supervise(lambda name, *_: self.restarts.append(name)))

    @contextlib.asynccontextmanager
    async def unsupervised(self) -> AsyncIterator[None]:
        """Nothing that exits meanwhile is started again (until the end of the block)."""
        assert self.supervising is not None
        self.supervising.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.supervising
        try:
            yield
        finally:
            self.supervise()

    async def back(self, *killed: Process) -> None:
        """Until the stack has started each killed process again by itself, and serves through all."""

        async def started_again() -> bool:
            return all(self.stack.process(p.name) is not p for p in killed)

        await eventually(started_again, 30, "the killed processes started again")
        await self.stack.wait_ready(replicas=2, timeout_s=60)
        assert sorted(self.restarts[-len(killed) :]) == sorted(p.name for p in killed)


@pytest.fixture(scope="module")
async def supervised(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Supervised]:
    """A stack that starts again whatever exits, as ``sluice up`` runs it, with a Redis and a PostgreSQL
    of its own for the tests to stop."""
    state = tmp_path_factory.mktemp("faults")
    redis = RedisServer(free_ports(1)[0], state / "redis")
    postgres = PostgresServer(free_ports(1)[0], state / "postgres", durable=False)
    await redis.start()
    await postgres.start()
    options = stack_options(state, redis, postgres, "simulated")
    options.inference_env["SLUICE_INFERENCE_SIMULATED_PREFILL_PER_TOKEN_MS"] = str(PREFILL_MS_PER_TOKEN)
    local = Supervised(LocalStack(options), redis, postgres)
    try:
        await local.stack.start()
        local.supervise()
        yield local
        assert local.supervising is not None
        local.supervising.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await local.supervising
    finally:
        await local.stack.stop()
        await postgres.stop()
        await redis.stop()
        postgres.remove_data()


@dataclass
class Call:
    """One client call as its caller saw it."""

    events: list[generation_pb2.GenerateEvent] = field(default_factory=list)
    error: StreamError | None = None
    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    ended_at: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (when, tokens) of each event

    @property
    def tokens(self) -> int:
        return sum(len(e.delta.token_ids) for e in self.events if e.HasField("delta"))

    def tokens_by(self, moment: float) -> int:
        return sum(n for when, n in self.arrivals if when <= moment)

    @property
    def longest_silence(self) -> float:
        """The longest the caller waited for anything: its first event, the next, or the end."""
        moments = [self.started_at, *(when for when, _ in self.arrivals), self.ended_at]
        return max(b - a for a, b in zip(moments, moments[1:], strict=False))

    @property
    def request_id(self) -> str:
        """Sluice's id for the call (in its ``started`` event, after any ``queued`` ones)."""
        return next(e.started.request_id for e in self.events if e.HasField("started"))

    @property
    def finished(self) -> generation_pb2.Finished | None:
        last = self.events[-1] if self.events else None
        return last.finished if last is not None and last.HasField("finished") else None


async def run(client: GenerationClient, call: Call, prompt: str, max_tokens: int) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    call.started_at = time.monotonic()
    try:
        async for event in client.generate(generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling), 60):
            call.events.append(event)
            call.arrivals.append((time.monotonic(), len(event.delta.token_ids)))
            if event.HasField("delta"):
                call.first_token.set()
    except StreamError as exc:
        call.error = exc
    finally:
        call.ended_at = time.monotonic()


async def usage_count(postgres: PostgresServer) -> int:
    connection = await asyncpg.connect(postgres.url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage"))
    finally:
        await connection.close()


async def usage_rows(postgres: PostgresServer, calls: list[Call]) -> dict[str, list[int]]:
    """Each call's usage rows (their completion tokens), by its request id."""
    ids = [c.request_id for c in calls]
    connection = await asyncpg.connect(postgres.url)
    try:
        rows = await connection.fetch(
            "SELECT request_id, completion_tokens FROM usage WHERE request_id = ANY($1::text[])", ids
        )
    finally:
        await connection.close()
    found: dict[str, list[int]] = {request_id: [] for request_id in ids}
    for row in rows:
        found[row["request_id"]].append(row["completion_tokens"])
    return found


async def test_the_first_burst_after_start_is_limited(supervised: Supervised) -> None:
    # First in this module, so right after the stack started: 60 calls at once were all admitted
    # against a per-key limit, the rate-limit service failing open on its own client's timeouts;
    # with that fixed, 341 of 600 still were, Envoy giving up on the service's decisions after 100 ms.
    # 300 at once still went through in part at 100 ms; within 1 s they leave room for a loaded machine.
    burst = 300
    async with grpc.aio.insecure_channel(supervised.stack.edge) as edge:
        stub = generation_pb2_grpc.GenerationStub(edge)
        request = generation_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=1))

        async def call() -> grpc.StatusCode:
            try:
                async for _ in stub.Generate(request, metadata=(("x-api-key", LIMITED_KEY),), timeout=30):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(call() for _ in range(burst)))
    # The key's limit lets LIMITED_PER_HOUR through the edge (the queue then refuses the unknown key).
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == burst - LIMITED_PER_HOUR
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == LIMITED_PER_HOUR


async def test_a_killed_replica_aborts_the_streams_it_was_sending_and_resends_those_without_tokens(
    supervised: Supervised,
) -> None:
    stack = supervised.stack
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        # Streams with tokens flowing, then streams still prefilling a long prompt: about half on each replica.
        flowing = [Call() for _ in range(4)]
        tasks = [asyncio.create_task(run(client, c, "The river", 600)) for c in flowing]
        await asyncio.gather(*(c.first_token.wait() for c in flowing))
        prefilling = [Call() for _ in range(4)]
        long_prompt = "the keeper walks the channel and writes the level of the river " * 30
        tasks += [asyncio.create_task(run(client, c, long_prompt, 16)) for c in prefilling]

        def on_replicas() -> bool:  # a replica took each (its Started event), still prefilling
            return all(any(e.HasField("started") for e in c.events) for c in prefilling)

        await eventually(on_replicas, 5, "the long prompts taken by replicas")
        assert not any(c.first_token.is_set() for c in prefilling), "the prompts were prefilled too fast"
        replica = stack.process("inference-1")
        os.kill(replica.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    # Nothing reached a caller as an error: a stream with tokens ends ABORT with what it got, ...
    assert [c.error for c in flowing + prefilling] == [None] * 8
    aborted = [c for c in flowing if c.finished is not None and c.finished.reason == common_pb2.FINISH_REASON_ABORT]
    assert aborted, "no stream was on the killed replica"
    for call in flowing:
        assert call.finished is not None
        assert call.finished.usage.completion_tokens == call.tokens
    # ... and one without was sent to the other replica and finished in full.
    for call in prefilling:
        assert call.finished is not None and call.finished.reason == common_pb2.FINISH_REASON_LENGTH
        assert call.tokens == 16

    # Each call billed once, for what its caller received.
    async def billed() -> bool:
        rows = await usage_rows(supervised.postgres, flowing + prefilling)
        return all(len(r) == 1 for r in rows.values())

    await eventually(billed, 5, "a usage row for every call")
    calls = flowing + prefilling
    rows = await usage_rows(supervised.postgres, calls)
    assert [rows[c.request_id] for c in calls] == [[c.tokens] for c in calls]
    await supervised.back(replica)


async def test_a_call_no_replica_could_take_is_refused_unavailable_and_not_billed(supervised: Supervised) -> None:
    stack = supervised.stack
    killed = [stack.process(name) for name in ("inference-1", "inference-2")]
    rows_before = await usage_count(supervised.postgres)
    async with supervised.unsupervised(), GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        for process in killed:
            process.signal_group(signal.SIGKILL)
            await process.wait()
        call = Call()
        # Admitted (the replicas still count as capacity for ENGINE_TTL_S), sent again and again, then
        # refused; Envoy tries it on the other queue replica too.
        await run(client, call, "The river", 4)
    assert call.error is not None and call.error.code == grpc.StatusCode.UNAVAILABLE, call.error
    assert await usage_count(supervised.postgres) == rows_before, "an attempt with no work for the caller was billed"
    await supervised.back(*killed)


async def test_killed_queue_replicas_bill_every_call_once(supervised: Supervised) -> None:
    stack = supervised.stack
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        flowing = [Call() for _ in range(4)]
        tasks = [asyncio.create_task(run(client, c, "The river", 2000)) for c in flowing]
        await asyncio.gather(*(c.first_token.wait() for c in flowing))

        async def drafts_updated() -> bool:  # streamed long enough that a draft update saw tokens
            return all(time.monotonic() - c.arrivals[0][0] > 2 * DRAFT_INTERVAL_S + 0.5 for c in flowing)

        await eventually(drafts_updated, 10, "streams two draft updates long")
        finished = [Call() for _ in range(6)]
        await asyncio.gather(*(run(client, c, "The river", 16) for c in finished))
        # The moment the last caller heard it finished, before any batch of usage records could go out.
        killed = [stack.process(name) for name in ("queue-1", "queue-2")]
        for process in killed:
            process.signal_group(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(*tasks)
    assert all(c.finished is not None and c.tokens == 16 for c in finished)
    assert all(c.error is not None and c.error.code == grpc.StatusCode.UNAVAILABLE for c in flowing)

    # A finished call billed as it finished; one cut off by the kill as its replica last saw it
    # (at most USAGE_DRAFT_INTERVAL_S of tokens short of what its caller got), by another replica.
    async def billed() -> bool:
        return all(len(r) == 1 for r in (await usage_rows(supervised.postgres, finished + flowing)).values())

    await eventually(billed, 15, "a usage row for every call")
    rows = await usage_rows(supervised.postgres, finished + flowing)
    assert [rows[c.request_id] for c in finished] == [[16]] * len(finished)
    for call in flowing:
        assert call.tokens_by(killed_at - DRAFT_INTERVAL_S - 0.5) <= rows[call.request_id][0] <= call.tokens
    await supervised.back(*killed)


async def streaming(client: GenerationClient, n: int, max_tokens: int) -> tuple[list[Call], list[asyncio.Task[None]]]:
    """``n`` streams with tokens flowing."""
    calls = [Call() for _ in range(n)]
    tasks = [asyncio.create_task(run(client, c, "The river", max_tokens)) for c in calls]
    await asyncio.gather(*(c.first_token.wait() for c in calls))
    return calls, tasks


async def billed_as_received(supervised: Supervised, calls: list[Call], within_s: float = 5) -> None:
    """Until each call has one usage row, for the tokens its caller received."""

    async def billed() -> bool:
        rows = await usage_rows(supervised.postgres, calls)
        return all(len(r) == 1 for r in rows.values())

    await eventually(billed, within_s, "a usage row for every call")
    rows = await usage_rows(supervised.postgres, calls)
    assert [rows[c.request_id] for c in calls] == [[c.tokens] for c in calls]


async def served(client: GenerationClient) -> bool:
    call = Call()
    await run(client, call, "The river", 4)
    return call.finished is not None


async def test_while_redis_stalls_running_streams_go_on_and_new_calls_are_refused_unavailable(
    supervised: Supervised,
) -> None:
    assert supervised.redis.process is not None
    async with GenerationClient(supervised.stack.edge, api_key=supervised.stack.demo_api_key) as client:
        flowing, tasks = await streaming(client, 4, 200)
        supervised.redis.process.signal_group(signal.SIGSTOP)
        refused: list[Call] = []
        try:
            stalled_until = time.monotonic() + REDIS_STALL_S
            while time.monotonic() < stalled_until:
                refused.append(call := Call())
                await run(client, call, "The river", 4)
        finally:
            supervised.redis.process.signal_group(signal.SIGCONT)
        await asyncio.gather(*tasks)
        recovery_s = await eventually(lambda: served(client), 5, "a new call served after the stall")
    for call in flowing:
        assert call.finished is not None and call.tokens == 200
        assert call.longest_silence < 1.0
    for call in refused:
        assert call.error is not None and call.error.code == grpc.StatusCode.UNAVAILABLE, call.error
        assert call.error.error.retry_after_s is not None  # type: ignore[attr-defined]
        assert call.ended_at - call.started_at < 3.0  # three attempts of REDIS_TIMEOUT_MS each, and no more
    assert recovery_s < 2.0
    await billed_as_received(supervised, flowing)


async def test_after_redis_restarts_empty_running_streams_go_on_and_every_new_call_is_served(
    supervised: Supervised,
) -> None:
    redis = supervised.redis
    assert redis.process is not None
    async with GenerationClient(supervised.stack.edge, api_key=supervised.stack.demo_api_key) as client:
        flowing, tasks = await streaming(client, 4, 200)
        redis.process.signal_group(signal.SIGKILL)
        await redis.process.wait()
        await redis.start()  # empty: it keeps nothing on disk
        after = [Call() for _ in range(8)]
        for call in after:  # one at a time: each meets a pooled connection the restart broke, if any is left
            await run(client, call, "The river", 8)
        await asyncio.gather(*tasks)
    assert [c.error for c in flowing + after] == [None] * 12
    await billed_as_received(supervised, flowing + after)


async def test_while_postgresql_is_down_known_keys_are_served_and_their_usage_written_once_it_is_back(
    supervised: Supervised,
) -> None:
    postgres = supervised.postgres
    async with GenerationClient(supervised.stack.edge, api_key=supervised.stack.demo_api_key) as client:
        assert await served(client)  # the key is known
        flowing, tasks = await streaming(client, 4, 200)
        await postgres.stop()
        try:
            during = [Call() for _ in range(4)]
            await asyncio.gather(*(run(client, c, "The river", 16) for c in during))
            await asyncio.gather(*tasks)
        finally:
            await postgres.start()
    for call in flowing + during:
        assert call.finished is not None, call.error
        assert call.longest_silence < 1.5  # a finished call waits up to USAGE_COMMIT_TIMEOUT_MS for its row
    await billed_as_received(supervised, flowing + during, within_s=15)


def postgres_processes(postgres: PostgresServer) -> list[int]:
    """PostgreSQL's server and its children (each in a session of its own, out of reach of its group)."""
    assert postgres.process is not None
    pids = [postgres.process.pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The parent's pid is the second field after the parenthesised command name.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pids[0]:
                pids.append(int(stat.parent.name))
    return pids


async def test_while_postgresql_stalls_known_keys_are_served_and_their_usage_written_once_it_answers(
    supervised: Supervised,
) -> None:
    async with GenerationClient(supervised.stack.edge, api_key=supervised.stack.demo_api_key) as client:
        assert await served(client)  # the key is known
        flowing, tasks = await streaming(client, 4, 100)
        stalled = postgres_processes(supervised.postgres)
        assert len(stalled) > 1, "no connection to stall"
        for pid in stalled:
            os.kill(pid, signal.SIGSTOP)
        try:
            during = [Call() for _ in range(4)]
            await asyncio.gather(*(run(client, c, "The river", 16) for c in during))
            await asyncio.gather(*tasks)
        finally:
            for pid in stalled:
                os.kill(pid, signal.SIGCONT)
    for call in flowing + during:
        assert call.finished is not None, call.error
        assert call.longest_silence < 2.0  # a finished call waits up to USAGE_COMMIT_TIMEOUT_MS for its row
    await billed_as_received(supervised, flowing + during, within_s=15)


async def test_while_the_rate_limit_service_stalls_budgeted_calls_go_ahead_unchecked_and_are_billed(
    supervised: Supervised,
) -> None:
    stack = supervised.stack
    _, key = await tenant_with_key(stack, "budgeted-in-a-stall", tokens_per_minute=1_000_000)
    ratelimit = stack.process("ratelimit")

    async def ratelimit_unhealthy() -> bool:
        return await stack.healthy_hosts("ratelimit") == 0

    async with GenerationClient(stack.edge, api_key=key) as client:
        assert await served(client)
        ratelimit.signal_group(signal.SIGSTOP)
        try:
            during = [Call() for _ in range(4)]
            await asyncio.gather(*(run(client, c, "The river", 16) for c in during))
            await eventually(ratelimit_unhealthy, 10, "Envoy's health checks find the stalled service")
            after = [Call() for _ in range(4)]
            await asyncio.gather(*(run(client, c, "The river", 16) for c in after))
        finally:
            ratelimit.signal_group(signal.SIGCONT)
    for call in during + after:
        assert call.finished is not None, call.error
    # Envoy's edge filter (1 s) and the budget (BUDGET_TIMEOUT_MS, 250 ms) each wait a bounded time, ...
    assert max(call.longest_silence for call in during) < 2.0
    # ... and once the service fails its health checks, calls no longer wait for it at all.
    assert max(call.longest_silence for call in after) < 0.5
    await billed_as_received(supervised, during + after)


async def test_stopping_the_stack_under_load_finishes_every_stream_bills_each_once_and_leaves_nothing(
    supervised: Supervised,
) -> None:
    stack = supervised.stack
    groups = [stack.process(name).pid for name in stack.process_names()]
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        flowing, tasks = await streaming(client, 6, 100)
        await stack.stop()
        await asyncio.gather(*tasks)
    for call in flowing:
        assert call.finished is not None and call.tokens == 100, call.error
    await billed_as_received(supervised, flowing)
    for group in groups:  # each process ran in a group of its own, with whatever it started
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
