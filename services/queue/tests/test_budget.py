"""Refunds of unused budget are gathered per tenant and sent together, none lost at shutdown."""

from __future__ import annotations

import asyncio

from envoy_api.envoy.service.ratelimit.v3 import rls_pb2
from sluice_queue.budget import Budgets, Reservation


class RecordingRateLimit:
    """Stands in for the rate-limit stub: records each call's (tenant, hits, negative) descriptors."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int, bool]]] = []

    async def ShouldRateLimit(
        self,
        request: rls_pb2.RateLimitRequest,
        timeout: float,  # noqa: ASYNC109 - the stub's
    ) -> rls_pb2.RateLimitResponse:
        self.calls.append([(d.entries[0].value, d.hits_addend.value, d.is_negative_hits) for d in request.descriptors])
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


async def test_refunds_are_gathered_per_tenant_into_one_call() -> None:
    ratelimit = RecordingRateLimit()
    budgets = Budgets(ratelimit, "sluice-budget", refund_interval_s=0.05)  # type: ignore[arg-type]
    running = asyncio.create_task(budgets.run())
    budgets.settle(Reservation("a", 1000, tokens=100), used=30)
    budgets.settle(Reservation("a", 1000, tokens=100), used=90)
    budgets.settle(Reservation("b", 500, tokens=50), used=20)
    budgets.settle(Reservation("b", 500, tokens=50), used=50)  # nothing unused
    await asyncio.sleep(0.2)
    assert ratelimit.calls == [[("a", 80, True), ("b", 30, True)]]
    running.cancel()


async def test_refunds_still_gathered_at_shutdown_are_sent() -> None:
    ratelimit = RecordingRateLimit()
    budgets = Budgets(ratelimit, "sluice-budget", refund_interval_s=60)  # type: ignore[arg-type]
    running = asyncio.create_task(budgets.run())
    budgets.settle(Reservation("a", 1000, tokens=100), used=1)
    await asyncio.sleep(0)
    running.cancel()
    await budgets.close()
    assert ratelimit.calls == [[("a", 99, True)]]
