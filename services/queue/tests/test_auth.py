"""A key in use never waits for its lookup; a revoked one stops working within a second; an outage is survived."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import Unauthenticated, Unavailable
from sluice_devstack.waiting import eventually
from sluice_queue.auth import Authenticator, api_key_from

KEY = [("authorization", "Bearer k1")]


class SlowDataStore:
    """Stands in for the data-access stub: each lookup takes a while; ``revoked`` keys are unknown."""

    def __init__(self) -> None:
        self.lookups = 0
        self.running = 0
        self.most_at_once = 0
        self.revoked: set[str] = set()
        self.answer = asyncio.Event()

    async def GetTenantByApiKey(
        self,
        request: datastore_pb2.GetTenantByApiKeyRequest,
        timeout: float | None,  # noqa: ASYNC109 - the stub's
    ) -> datastore_pb2.Tenant:
        self.lookups += 1
        if len(request.api_key) > 256:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "api_key: too long"
            )
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.answer.wait()
        finally:
            self.running -= 1
        if request.api_key in self.revoked:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no such key"
            )
        return datastore_pb2.Tenant(id="t1", name="one")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def settled(authenticator: Authenticator) -> None:
    """Until the lookups that were answered have finished."""
    await eventually(lambda: not authenticator._inflight, 1, "no lookup in flight")


async def test_a_key_in_use_is_looked_up_again_before_it_expires(clock: Clock) -> None:
    datastore = SlowDataStore()
    authenticator = Authenticator(datastore, clock)
    datastore.answer.set()
    assert (await authenticator.tenant(KEY)).id == "t1"
    datastore.answer.clear()  # from now on, a call that waits for a lookup hangs
    for _ in range(5):
        clock.now += 0.3
        async with asyncio.timeout(1):
            assert (await authenticator.tenant(KEY)).id == "t1"
        datastore.answer.set()  # the refresh started by that call ends
        await settled(authenticator)
        datastore.answer.clear()
    assert datastore.lookups > 1


async def test_a_revoked_key_stops_working_within_a_second(clock: Clock) -> None:
    datastore = SlowDataStore()
    authenticator = Authenticator(datastore, clock)
    datastore.answer.set()
    await authenticator.tenant(KEY)
    datastore.revoked.add("k1")
    clock.now += 0.6
    await authenticator.tenant(KEY)  # still known; its refresh finds the key revoked
    await settled(authenticator)
    with pytest.raises(Unauthenticated):
        await authenticator.tenant(KEY)


async def test_a_caller_leaving_does_not_fail_the_others_waiting_for_the_same_lookup(clock: Clock) -> None:
    datastore = SlowDataStore()
    authenticator = Authenticator(datastore, clock)
    first = asyncio.create_task(authenticator.tenant(KEY))
    second = asyncio.create_task(authenticator.tenant(KEY))
    await eventually(lambda: datastore.running == 1, 1, "the shared lookup under way")
    first.cancel()  # its caller went away
    with contextlib.suppress(asyncio.CancelledError):
        await first
    datastore.answer.set()
    assert (await second).id == "t1"
    assert datastore.lookups == 1


async def test_a_malformed_key_is_unauthenticated_without_a_lookup_or_an_internal_field(clock: Clock) -> None:
    datastore = SlowDataStore()
    authenticator = Authenticator(datastore, clock)
    with pytest.raises(Unauthenticated, match="malformed API key") as caught:
        await authenticator.tenant([("x-api-key", "k" * 7000)])
    assert "api_key" not in caught.value.message and "must be given" not in caught.value.message
    assert datastore.lookups == 0


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ([("x-api-key", "k1")], "k1"),
        ([("authorization", "Bearer k1")], "k1"),
        ([("authorization", "bearer   k1 ")], "k1"),
        ([("x-api-key", ""), ("authorization", "Bearer k1")], "k1"),
        ([("authorization", "Basic k1")], None),
        ([("authorization", "Bearer  ")], None),
    ],
)
def test_the_api_key_is_x_api_key_or_the_bearer_token(metadata: list[tuple[str, str]], key: str | None) -> None:
    assert api_key_from(metadata) == key


@pytest.mark.parametrize(
    "metadata",
    [
        [("x-api-key", "k1"), ("x-api-key", "k2")],
        [("x-api-key", "k1"), ("x-api-key", "k1")],
        [("authorization", "Bearer k1"), ("x-api-key", "k2")],
        [("authorization", "Bearer k1"), ("authorization", "Bearer k2")],
    ],
)
def test_more_than_one_credential_is_refused(metadata: list[tuple[str, str]]) -> None:
    # Envoy's edge limits a call as one key: it must never be billed as another.
    with pytest.raises(Unauthenticated, match="one credential"):
        api_key_from(metadata)


class AwayDataStore:
    """Stands in for the data-access stub while PostgreSQL stalls: every lookup runs out of time."""

    async def GetTenantByApiKey(
        self,
        request: datastore_pb2.GetTenantByApiKeyRequest,
        timeout: float | None,  # noqa: ASYNC109 - the stub's
    ) -> datastore_pb2.Tenant:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded"
        )


async def test_while_the_tenant_store_is_away_known_keys_are_served_stale_and_others_are_unavailable(
    clock: Clock,
) -> None:
    datastore = SlowDataStore()
    authenticator = Authenticator(datastore, clock, stale_s=300)
    datastore.answer.set()
    await authenticator.tenant(KEY)
    authenticator._datastore = AwayDataStore()  # PostgreSQL stalls from here on
    clock.now += 60  # the tenant's entry expired during the stall
    assert (await authenticator.tenant(KEY)).id == "t1"
    with pytest.raises(Unavailable) as unknown:  # not DEADLINE_EXCEEDED after the caller's whole deadline
        await authenticator.tenant([("x-api-key", "never-seen")])
    assert unknown.value.retry_after_s is not None
    clock.now += 300  # known too long ago to trust
    with pytest.raises(Unavailable):
        await authenticator.tenant(KEY)


async def test_keys_no_one_issued_cannot_load_the_tenant_store_beyond_a_bound(clock: Clock) -> None:
    # Random keys each pass the edge's per-key limit; every one used to become a lookup at once.
    datastore = SlowDataStore()
    authenticator = Authenticator(datastore, clock, timeout_s=0.2, max_lookups=8)
    datastore.answer.set()
    await authenticator.tenant(KEY)
    datastore.answer.clear()  # the store is slow from here on
    clock.now += 60
    calls = [asyncio.ensure_future(authenticator.tenant([("x-api-key", f"random-{i}")])) for i in range(100)]
    # A known key waiting for a turn is served as last known; the random ones are refused with a retry hint.
    assert (await authenticator.tenant(KEY)).id == "t1"
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes)
    assert datastore.most_at_once == 8
