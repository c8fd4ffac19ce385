"""Budgets: reserved ahead so most requests need no call, refused exactly, and every token given back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, TypedDict, Unpack

import grpc
import pytest
from google.protobuf import duration_pb2

from sluice.datastore.v1 import datastore_pb2
from sluice.ratelimit.v1 import budgets_pb2, budgets_pb2_grpc
from sluice_core.channels import insecure_channel
from sluice_core.errors import ResourceExhausted, Unavailable
from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_devstack.waiting import eventually
from sluice_queue.budget import Budgets, reserve_tokens


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RateLimit:
    """Stands in for the Budgets stub: a budget per (name, tenant) of ``left`` hits; records every call
    as (name, tenant, hits, whether it was a refund)."""

    def __init__(self, left: dict[tuple[str, str], int]) -> None:
        self.left = left
        self.calls: list[list[tuple[str, str, int, bool]]] = []

    async def Reserve(
        self,
        request: budgets_pb2.ReserveRequest,
        timeout: float,  # noqa: ASYNC109 - the stub's
    ) -> budgets_pb2.ReserveResponse:
        self.calls.append([(b.name, b.owner, b.hits, False) for b in request.budgets])
        fits = [self.left[(b.name, b.owner)] >= b.hits for b in request.budgets]
        if all(fits):
            for b in request.budgets:
                self.left[(b.name, b.owner)] -= b.hits
        standings = [
            budgets_pb2.Standing(fits=fit, retry_after=None if fit else duration_pb2.Duration(seconds=7))
            for fit in fits
        ]
        return budgets_pb2.ReserveResponse(reserved=all(fits), standings=standings)

    async def Refund(
        self,
        request: budgets_pb2.RefundRequest,
        timeout: float,  # noqa: ASYNC109 - the stub's
    ) -> budgets_pb2.RefundResponse:
        self.calls.append([(b.name, b.owner, b.hits, True) for b in request.budgets])
        for b in request.budgets:
            self.left[(b.name, b.owner)] += b.hits
        return budgets_pb2.RefundResponse()


def tenant(tenant_id: str, tokens_per_minute: int, requests_per_minute: int = 0) -> datastore_pb2.Tenant:
    return datastore_pb2.Tenant(
        id=tenant_id, tokens_per_minute=tokens_per_minute, requests_per_minute=requests_per_minute
    )


class Settings(TypedDict, total=False):
    lease_s: float
    idle_s: float
    refund_interval_s: float


def budgets(ratelimit: RateLimit, clock: Clock, **settings: Unpack[Settings]) -> Budgets:
    return Budgets(ratelimit, clock=clock, **settings)


async def test_one_call_reserves_ahead_for_the_next_requests() -> None:
    ratelimit, clock = RateLimit({("tenant_tokens", "a"): 6000, ("tenant_requests", "a"): 600}), Clock()
    budget = budgets(ratelimit, clock)  # a lease is 3 s: 300 tokens and 30 requests of these limits
    first = await budget.reserve(tenant("a", 6000, 600), 100, timeout_s=1)
    assert ratelimit.calls == [[("tenant_requests", "a", 31, False), ("tenant_tokens", "a", 400, False)]]
    for _ in range(3):
        assert await budget.reserve(tenant("a", 6000, 600), 100, timeout_s=1) is not None
    assert len(ratelimit.calls) == 1, "the next three came out of the allowance"
    await budget.reserve(tenant("a", 6000, 600), 100, timeout_s=1)
    assert len(ratelimit.calls) == 2, "the allowance was spent"
    assert first is not None and first.tokens == 100


async def test_unused_and_idle_allowances_go_back_so_the_tenant_pays_what_it_used() -> None:
    ratelimit, clock = RateLimit({("tenant_tokens", "a"): 6000}), Clock()
    budget = budgets(ratelimit, clock, refund_interval_s=0.01, idle_s=1.0)
    running = asyncio.create_task(budget.run())
    reservations = [await budget.reserve(tenant("a", 6000), 100, timeout_s=1) for _ in range(2)]
    for reservation in reservations:
        assert reservation is not None
        budget.settle(reservation, used=40)

    def gave_back() -> bool:
        return any(refund for call in ratelimit.calls for _, _, _, refund in call)

    await eventually(gave_back, 2, "the part beyond one lease given back")
    assert ratelimit.left[("tenant_tokens", "a")] < 6000 - 80, "the unused part is kept here for the next requests"
    clock.now = 1.0
    await eventually(lambda: ratelimit.left[("tenant_tokens", "a")] == 6000 - 80, 2, "the idle allowance given back")
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running


async def test_near_its_limit_a_tenant_gets_an_exact_reservation_then_a_refusal_with_a_hint() -> None:
    ratelimit, clock = RateLimit({("tenant_tokens", "a"): 150}), Clock()
    budget = budgets(ratelimit, clock)
    assert await budget.reserve(tenant("a", 6000), 100, timeout_s=1) is not None  # 100 + a 300 lease does not fit
    assert ratelimit.calls == [[("tenant_tokens", "a", 400, False)], [("tenant_tokens", "a", 100, False)]]
    with pytest.raises(ResourceExhausted, match="tokens per minute; retry in 7 s") as refused:
        await budget.reserve(tenant("a", 6000), 100, timeout_s=1)
    assert refused.value.retry_after_s == 7
    assert ratelimit.left[("tenant_tokens", "a")] == 50, "a refusal consumes nothing"


async def test_a_budget_too_small_for_a_lease_is_reserved_per_request() -> None:
    ratelimit, clock = RateLimit({("tenant_tokens", "a"): 600}), Clock()
    budget = budgets(ratelimit, clock)  # a lease of 30 tokens holds no request of 100
    for _ in range(2):
        await budget.reserve(tenant("a", 600), 100, timeout_s=1)
    assert ratelimit.calls == [[("tenant_tokens", "a", 100, False)]] * 2


async def test_give_backs_are_gathered_per_tenant_into_one_call_and_sent_at_shutdown() -> None:
    ratelimit, clock = RateLimit({("tenant_tokens", "a"): 600, ("tenant_tokens", "b"): 600}), Clock()
    budget = budgets(ratelimit, clock, refund_interval_s=60)
    running = asyncio.create_task(budget.run())
    for name, used in (("a", 30), ("a", 90), ("b", 20)):
        reservation = await budget.reserve(tenant(name, 600), 100, timeout_s=1)
        assert reservation is not None
        budget.settle(reservation, used)
    await asyncio.sleep(0)  # not a timed wait: one turn of the loop, so that the cancel finds run() in its interval
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await budget.close()
    assert ratelimit.calls[-1] == [("tenant_tokens", "a", 80, True), ("tenant_tokens", "b", 80, True)]
    assert ratelimit.left == {("tenant_tokens", "a"): 600 - 120, ("tenant_tokens", "b"): 600 - 20}


class Unreachable(RateLimit):
    """Takes reservations, but give-backs fail with ``code`` while it is set."""

    code: grpc.StatusCode | None = None

    async def Refund(
        self,
        request: budgets_pb2.RefundRequest,
        timeout: float,  # noqa: ASYNC109 - the stub's
    ) -> budgets_pb2.RefundResponse:
        if self.code is not None:
            self.calls.append([])
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no healthy upstream")
        return await super().Refund(request, timeout)


@pytest.mark.parametrize(
    ("code", "given_back"), [(grpc.StatusCode.UNAVAILABLE, 80), (grpc.StatusCode.DEADLINE_EXCEEDED, 0)]
)
async def test_a_give_back_no_service_took_is_sent_again_and_one_that_may_have_landed_is_not(
    code: grpc.StatusCode, given_back: int
) -> None:
    ratelimit, clock = Unreachable({("tenant_tokens", "a"): 600}), Clock()
    budget = budgets(ratelimit, clock, refund_interval_s=0.01)
    running = asyncio.create_task(budget.run())
    reservation = await budget.reserve(tenant("a", 600), 100, timeout_s=1)
    assert reservation is not None
    ratelimit.code = code
    budget.settle(reservation, used=20)  # 80 to give back
    clock.now = 2.0  # idle: everything goes back
    await eventually(lambda: ratelimit.calls[-1] == [], 2, "a give-back failed")
    ratelimit.code = None
    if given_back:
        await eventually(lambda: ratelimit.left[("tenant_tokens", "a")] == 600 - 20, 2, "the give-back sent again")
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await budget.close()  # sends whatever is still owed
    assert ratelimit.left[("tenant_tokens", "a")] == 600 - 100 + given_back


async def test_a_request_larger_than_the_whole_budget_is_refused_without_a_retry_hint() -> None:
    ratelimit = RateLimit({("tenant_tokens", "a"): 1000, ("tenant_requests", "a"): 600})
    with pytest.raises(ResourceExhausted, match="lower max_tokens") as refused:
        await budgets(ratelimit, Clock()).reserve(tenant("a", 1000), 1001, None)
    assert refused.value.retry_after_s is None
    assert ratelimit.calls == []


def test_a_reservation_is_at_most_the_models_context() -> None:
    # A long conversation is cut to the context by inference; counted in bytes it would be far more.
    assert reserve_tokens(["x" * 100_000], 64, context=2048) == 2048
    assert reserve_tokens(["hello"], 64, context=2048) == 5 + 16 + 64
    assert reserve_tokens(["x" * 100_000], 64, context=0) == 100_000 + 16 + 64  # not known yet


class Stalled(budgets_pb2_grpc.BudgetsServicer):
    """A rate-limit service that takes its time: as one stalled on a full CPU or a lost Redis."""

    async def Reserve(
        self, request: budgets_pb2.ReserveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> budgets_pb2.ReserveResponse:
        await asyncio.sleep(30)  # not synchronisation: the stall under test
        return budgets_pb2.ReserveResponse(reserved=True)

    async def Refund(
        self, request: budgets_pb2.RefundRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> budgets_pb2.RefundResponse:
        return budgets_pb2.RefundResponse()


@pytest.fixture(scope="module")
async def stalled() -> AsyncIterator[budgets_pb2_grpc.BudgetsAsyncStub]:
    server = GrpcServer(ServiceSettings(drain_delay_s=0, shutdown_grace_s=0.1), ["budgets"], handle_signals=False)
    server.add(budgets_pb2_grpc.add_BudgetsServicer_to_server, Stalled(), "budgets")
    async with server, insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield budgets_pb2_grpc.BudgetsStub(channel)


@pytest.mark.parametrize("fail_closed", [False, True])
async def test_a_stalled_rate_limit_service_holds_a_request_no_longer_than_the_budget_timeout(
    stalled: budgets_pb2_grpc.BudgetsAsyncStub, fail_closed: bool
) -> None:
    # It held every budgeted request for the whole stall (23.7 s of a 25 s one).
    budget = Budgets(stalled, timeout_s=0.2, fail_closed=fail_closed)
    start = time.monotonic()
    if fail_closed:
        with pytest.raises(Unavailable) as caught:
            await budget.reserve(tenant("a", 6000), 100, timeout_s=None)
        assert caught.value.retry_after_s is not None
    else:
        assert await budget.reserve(tenant("a", 6000), 100, timeout_s=None) is None  # let through, unchecked
    assert time.monotonic() - start < 1.0
