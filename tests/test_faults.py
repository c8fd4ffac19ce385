"""Faults injected into a running stack under streaming load: what callers see, and what is billed.

The stack runs on the simulated engine with a slow prefill (4 ms a prompt
token), so that a long prompt leaves a window in which a request has a
replica but no token yet, and is supervised as ``sluice up`` runs it: what a
fault kills is started again, and each test waits until it is back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from sluice.common.v1 import generation_pb2 as common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_cli.postgres_server import PostgresServer
from sluice_cli.processes import Process
from sluice_cli.redis_server import RedisServer
from sluice_cli.stack import LocalStack
from sluice_client import GenerationClient, StreamError

from .conftest import eventually, stack_options

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PREFILL_MS_PER_TOKEN = 4
DRAFT_INTERVAL_S = 1.0  # the queue's default USAGE_DRAFT_INTERVAL_S


@dataclass
class Supervised:
    stack: LocalStack
    restarts: list[str] = field(default_factory=list)

    async def back(self, *killed: Process) -> None:
        """Until the stack has started each killed process again by itself, and serves through all."""

        async def started_again() -> bool:
            return all(self.stack.process(p.name) is not p for p in killed)

        await eventually(started_again, 30, "the killed processes started again")
        await self.stack.wait_ready(replicas=2, timeout_s=60)
        assert sorted(self.restarts[-len(killed) :]) == sorted(p.name for p in killed)


@pytest.fixture(scope="module")
async def supervised(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, postgres: PostgresServer
) -> AsyncIterator[Supervised]:
    """A stack that starts again whatever exits, as ``sluice up`` runs it."""
    options = stack_options(tmp_path_factory.mktemp("faults"), redis_server, postgres, "simulated")
    options.inference_env["SLUICE_INFERENCE_SIMULATED_PREFILL_PER_TOKEN_MS"] = str(PREFILL_MS_PER_TOKEN)
    local = Supervised(LocalStack(options))
    try:
        await local.stack.start()
        supervising = asyncio.create_task(local.stack.supervise(lambda name, *_: local.restarts.append(name)))
        yield local
        supervising.cancel()
    finally:
        await local.stack.stop()


@dataclass
class Call:
    """One client call as its caller saw it."""

    events: list[generation_pb2.GenerateEvent] = field(default_factory=list)
    error: StreamError | None = None
    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (when, tokens) of each delta

    @property
    def tokens(self) -> int:
        return sum(len(e.delta.token_ids) for e in self.events if e.HasField("delta"))

    def tokens_by(self, moment: float) -> int:
        return sum(n for when, n in self.arrivals if when <= moment)

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
    try:
        async for event in client.generate(generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling), 60):
            call.events.append(event)
            if event.HasField("delta"):
                call.arrivals.append((time.monotonic(), len(event.delta.token_ids)))
                call.first_token.set()
    except StreamError as exc:
        call.error = exc


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


async def test_a_killed_replica_aborts_the_streams_it_was_sending_and_resends_those_without_tokens(
    supervised: Supervised, postgres: PostgresServer
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
        await asyncio.sleep(0.3)
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
        rows = await usage_rows(postgres, flowing + prefilling)
        return all(len(r) == 1 for r in rows.values())

    await eventually(billed, 5, "a usage row for every call")
    calls = flowing + prefilling
    rows = await usage_rows(postgres, calls)
    assert [rows[c.request_id] for c in calls] == [[c.tokens] for c in calls]
    await supervised.back(replica)


async def test_killed_queue_replicas_bill_every_call_once(supervised: Supervised, postgres: PostgresServer) -> None:
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
        return all(len(r) == 1 for r in (await usage_rows(postgres, finished + flowing)).values())

    await eventually(billed, 15, "a usage row for every call")
    rows = await usage_rows(postgres, finished + flowing)
    assert [rows[c.request_id] for c in finished] == [[16]] * len(finished)
    for call in flowing:
        assert call.tokens_by(killed_at - DRAFT_INTERVAL_S - 0.5) <= rows[call.request_id][0] <= call.tokens
    await supervised.back(*killed)
