"""Budgets on real Redis: reservations all or nothing, refunds, when to retry, hostile input, Redis away."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from sluice.ratelimit.v1 import budgets_pb2
from sluice_core.errors import InvalidArgument, Unavailable
from sluice_ratelimit.budgets import BudgetsServicer
from sluice_ratelimit.limiter import Limiter

CONTEXT: Any = None  # the servicer does not use its call's context


def budget(name: str, hits: int, limit: int = 100, owner: str = "t1") -> budgets_pb2.Budget:
    return budgets_pb2.Budget(name=name, owner=owner, limit=limit, period_s=60, hits=hits)


async def reserve(budgets: BudgetsServicer, *wanted: budgets_pb2.Budget) -> budgets_pb2.ReserveResponse:
    return await budgets.Reserve(budgets_pb2.ReserveRequest(budgets=wanted), CONTEXT)


@pytest.fixture
def budgets(redis: Redis) -> BudgetsServicer:
    return BudgetsServicer(Limiter(redis, timeout_s=1.0), "sluice:test:")


async def test_a_reservation_takes_from_every_budget_or_from_none(budgets: BudgetsServicer) -> None:
    taken = await reserve(budgets, budget("requests", 1), budget("tokens", 60))
    assert taken.reserved and [s.remaining for s in taken.standings] == [99, 40]
    refused = await reserve(budgets, budget("requests", 1), budget("tokens", 60))
    assert not refused.reserved
    assert [s.fits for s in refused.standings] == [True, False]
    # 20 tokens more fit in 12 s (100 a minute); the requests budget was not charged for the refusal.
    assert refused.standings[1].retry_after.seconds == 12
    probe = await reserve(budgets, budget("requests", 0), budget("tokens", 0))
    assert [s.remaining for s in probe.standings] == [99, 40]


async def test_a_refund_gives_back_what_was_not_used(budgets: BudgetsServicer) -> None:
    await reserve(budgets, budget("tokens", 90))
    await budgets.Refund(budgets_pb2.RefundRequest(budgets=[budget("tokens", 50)]), CONTEXT)
    assert (await reserve(budgets, budget("tokens", 0))).standings[0].remaining == 60


async def test_budgets_of_different_owners_and_limits_are_apart(budgets: BudgetsServicer) -> None:
    await reserve(budgets, budget("tokens", 100, owner="a"))
    assert (await reserve(budgets, budget("tokens", 100, owner="b"))).reserved
    assert (await reserve(budgets, budget("tokens", 100, limit=200, owner="a"))).reserved


async def test_more_hits_than_the_limit_get_no_time_to_retry(budgets: BudgetsServicer) -> None:
    refused = await reserve(budgets, budget("tokens", 101))
    assert not refused.reserved and not refused.standings[0].HasField("retry_after")


@pytest.mark.parametrize(
    ("wanted", "field"),
    [
        ([], "budgets"),
        ([budget("tokens", 1)] * 17, "budgets"),
        ([budget("", 1)], "budgets[0].name"),
        ([budget("tokens|owner=x", 1)], "budgets[0].name"),
        ([budget("tokens", 1, owner="")], "budgets[0].owner"),
        ([budget("tokens", 1, owner="x" * 129)], "budgets[0].owner"),
        ([budget("tokens", 1, limit=0)], "budgets[0].limit"),
        ([budgets_pb2.Budget(name="tokens", owner="t", limit=1, period_s=0, hits=1)], "budgets[0].period_s"),
        ([budget("tokens", 2**41)], "budgets[0].hits"),
    ],
)
async def test_hostile_reservations_name_the_field(
    budgets: BudgetsServicer, wanted: list[budgets_pb2.Budget], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await reserve(budgets, *wanted)
    assert caught.value.violations[0].field == field


async def test_a_refund_of_nothing_is_refused(budgets: BudgetsServicer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await budgets.Refund(budgets_pb2.RefundRequest(budgets=[budget("tokens", 0)]), CONTEXT)
    assert caught.value.violations[0].field == "budgets[0].hits"


async def test_without_redis_budgets_are_unavailable_with_a_retry_hint() -> None:
    gone = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    budgets = BudgetsServicer(Limiter(gone, timeout_s=0.2), "sluice:test:")
    with pytest.raises(Unavailable) as caught:
        await reserve(budgets, budget("tokens", 1))
    assert caught.value.retry_after_s is not None
    await gone.aclose()
