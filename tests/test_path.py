"""The public request path end to end: API keys, budgets, conversations, usage records."""

from __future__ import annotations

import time

import asyncpg
import grpc
import pytest

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2
from sluice.ratelimit.v1 import budgets_pb2, budgets_pb2_grpc
from sluice_client import GenerationClient, StreamError
from sluice_core.errors import ResourceExhausted
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.stack import LocalStack
from sluice_devstack.waiting import eventually

from .conftest import tenant_with_key

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def request(prompt: str = "river", max_tokens: int = 8, **fields: object) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling, **fields)  # type: ignore[arg-type]


async def run(
    stack: LocalStack, key: str | None, req: generation_pb2.GenerateRequest
) -> list[generation_pb2.GenerateEvent]:
    async with GenerationClient(stack.edge, api_key=key) as client:
        return [event async for event in client.generate(req, timeout=60)]


async def refused(stack: LocalStack, key: str | None, req: generation_pb2.GenerateRequest | None = None) -> StreamError:
    with pytest.raises(StreamError) as caught:
        await run(stack, key, req or request())
    return caught.value


async def tokens_left(stack: LocalStack, tenant_id: str, per_minute: int) -> int:
    """The tenant's token budget now, asked of the rate-limit service without spending any."""
    probe = budgets_pb2.Budget(name="tenant_tokens", owner=tenant_id, limit=per_minute, period_s=60, hits=0)
    async with stack.channel(stack.internal) as channel:
        answer = await budgets_pb2_grpc.BudgetsStub(channel).Reserve(budgets_pb2.ReserveRequest(budgets=[probe]))
    return int(answer.standings[0].remaining)


async def spent_once_refunded(stack: LocalStack, tenant_id: str, per_minute: int, most: int) -> int:
    """Tokens spent from the budget, once the refund (sent shortly after the stream ends) brought it to ``most``."""
    spent = per_minute

    async def refunded() -> bool:
        nonlocal spent
        spent = per_minute - await tokens_left(stack, tenant_id, per_minute)
        return spent <= most

    await eventually(refunded, 3, f"the unused reservation refunded, at most {most} tokens spent", interval_s=0.05)
    return spent


async def test_calls_without_a_valid_key_are_unauthenticated(stack: LocalStack) -> None:
    assert (await refused(stack, None)).code == grpc.StatusCode.UNAUTHENTICATED
    assert (await refused(stack, "sk-made-up")).code == grpc.StatusCode.UNAUTHENTICATED
    # Even with bad input: a caller without a valid key learns nothing about its request.
    assert (await refused(stack, None, request(prompt=""))).code == grpc.StatusCode.UNAUTHENTICATED
    tenant_id, key = await tenant_with_key(stack, "soon-revoked")
    assert (await run(stack, key, request()))[-1].HasField("finished")
    async with stack.channel(stack.internal) as channel:
        await datastore_pb2_grpc.DataStoreStub(channel).RevokeApiKey(datastore_pb2.RevokeApiKeyRequest(api_key=key))

    async def key_refused() -> bool:
        try:
            await run(stack, key, request(max_tokens=1))
        except StreamError as exc:
            assert exc.code == grpc.StatusCode.UNAUTHENTICATED
            return True
        return False

    await eventually(key_refused, 3, "the revoked key refused", interval_s=0.1)


async def test_the_token_budget_is_reserved_then_settled_to_what_was_used(stack: LocalStack) -> None:
    per_minute = 600  # refills 10 tokens a second: the tolerance below
    tenant_id, key = await tenant_with_key(stack, "budgeted", tokens_per_minute=per_minute)
    start = time.monotonic()
    async with GenerationClient(stack.edge, api_key=key) as client:
        events = [e async for e in client.generate(request("river", max_tokens=40), timeout=60)]
    used = events[0].started.prompt_tokens + events[-1].finished.usage.completion_tokens
    assert events[-1].finished.usage.completion_tokens == 40
    spent = await spent_once_refunded(stack, tenant_id, per_minute, most=used)
    refilled = (time.monotonic() - start) * per_minute / 60
    assert used - refilled - 1 <= spent <= used, f"spent {spent}, used {used}"


async def test_over_the_budget_is_resource_exhausted_with_a_retry_hint(stack: LocalStack) -> None:
    _, key = await tenant_with_key(stack, "frugal", tokens_per_minute=100)
    async with GenerationClient(stack.edge, api_key=key) as client:
        async for _ in client.generate(request("river", max_tokens=40), timeout=60):
            pass
    # 61 tokens reserved (5 bytes of prompt, 16 of template, 40), about 45 of 100 left.
    error = await refused(stack, key, request("river", max_tokens=40))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(error.error, ResourceExhausted) and error.error.retry_after_s
    assert "tokens per minute" in error.error.message
    # More than the whole budget: waiting would not help, so no hint.
    too_large = await refused(stack, key, request("river", max_tokens=120))
    assert too_large.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(too_large.error, ResourceExhausted) and too_large.error.retry_after_s is None
    assert "lower max_tokens" in too_large.error.message


async def test_a_caller_that_leaves_is_charged_for_what_it_got(stack: LocalStack) -> None:
    per_minute = 6000
    tenant_id, key = await tenant_with_key(stack, "leaver", tokens_per_minute=per_minute)
    received = prompt = 0
    start = time.monotonic()
    async with GenerationClient(stack.edge, api_key=key) as client:
        stream = client.generate(request("river", max_tokens=1000), timeout=60)
        async for event in stream:
            if event.HasField("started"):
                prompt = event.started.prompt_tokens
            if event.HasField("delta"):
                received += len(event.delta.token_ids)
                if received >= 10:
                    break
        stream.cancel()
    spent = await spent_once_refunded(stack, tenant_id, per_minute, most=500)
    refilled = (time.monotonic() - start) * per_minute / 60
    assert prompt + received - refilled - 1 <= spent, "the tokens sent were not charged"


async def test_conversations_carry_history_and_store_the_exchange(stack: LocalStack) -> None:
    key = stack.demo_api_key
    async with GenerationClient(stack.edge, api_key=key) as client:
        conversation = await client.create_conversation(timeout=10)
    first = await run(stack, key, request("The first question", conversation_id=conversation))
    second: list[generation_pb2.GenerateEvent] = []
    async with (
        GenerationClient(stack.edge, api_key=key) as client,
        stack.channel(stack.internal) as channel,
    ):
        async for event in client.generate(request("The second one", conversation_id=conversation), timeout=60):
            second.append(event)
            if event.HasField("finished"):
                # Read as soon as the caller hears it finished: a next turn sent now must see it.
                datastore = datastore_pb2_grpc.DataStoreStub(channel)
                tenant = await datastore.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=key))
                stored = [
                    (m.role, m.content)
                    async for m in datastore.GetConversation(
                        datastore_pb2.GetConversationRequest(conversation_id=conversation, tenant_id=tenant.id)
                    )
                ]
    alone = await run(stack, key, request("The second one"))
    assert second[0].started.prompt_tokens > alone[0].started.prompt_tokens  # the history went in front
    # PostgreSQL's text cannot hold a NUL, which the tiny model's tokens can make: stored as U+FFFD.
    replies = [
        "".join(e.delta.text for e in events if e.HasField("delta")).replace("\x00", "\ufffd")
        for events in (first, second)
    ]
    user, assistant = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
    assert stored == [
        (user, "The first question"),
        (assistant, replies[0]),
        (user, "The second one"),
        (assistant, replies[1]),
    ]
    other_tenant = (await tenant_with_key(stack, "nosy"))[1]
    nosy = await refused(stack, other_tenant, request("hi", conversation_id=conversation))
    assert nosy.code == grpc.StatusCode.NOT_FOUND


async def test_every_request_served_is_recorded_once(stack: LocalStack, postgres: PostgresServer) -> None:
    tenant_id, key = await tenant_with_key(stack, "recorded")
    bad = common_pb2.SamplingParams(max_tokens=8, temperature=5.0)
    assert (await refused(stack, key, generation_pb2.GenerateRequest(prompt="x", sampling=bad))).code == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    events = await run(stack, key, request(max_tokens=8))
    request_id = events[-1].finished.request_id
    connection = await asyncpg.connect(stack.database_url)
    try:

        async def recorded() -> bool:
            return await connection.fetchrow("SELECT 1 FROM usage WHERE request_id = $1", request_id) is not None

        await eventually(recorded, 5, f"a usage record of {request_id}", interval_s=0.1)
        row = await connection.fetchrow("SELECT * FROM usage WHERE request_id = $1", request_id)
        assert row is not None
        # A request refused before it was served (here, bad input) did no work and is not recorded.
        assert await connection.fetchval("SELECT count(*) FROM usage WHERE tenant_id = $1", tenant_id) == 1
    finally:
        await connection.close()
    assert str(row["tenant_id"]) == tenant_id
    assert (row["completion_tokens"], row["status"]) == (8, "length")
    assert row["prompt_tokens"] == events[0].started.prompt_tokens
