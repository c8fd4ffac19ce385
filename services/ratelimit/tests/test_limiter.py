"""The GCRA script in real Redis, on a controlled clock: exact counts, smooth refill, refunds, all or nothing."""

from __future__ import annotations

from redis.asyncio import Redis

from sluice_ratelimit.limiter import Check, Limiter, Mode

T0 = 1_800_000_000_000_000  # microseconds
SECOND = 1_000_000


def per_minute(limit: int, key: str = "k", hits: int = 1, **kwargs: object) -> Check:
    return Check(key, 60, limit, hits, **kwargs)  # type: ignore[arg-type]


async def admitted(limiter: Limiter, check: Check, count: int, now: int) -> int:
    results = [await limiter.decide([check], now) for _ in range(count)]
    return sum(r[0].admitted for r in results)


async def test_admits_exactly_the_limit_at_once_then_refills_smoothly(redis: Redis) -> None:
    limiter = Limiter(redis)
    assert await admitted(limiter, per_minute(10), 15, T0) == 10
    # One hit comes back every 6 s, not the whole limit at a window edge.
    assert await admitted(limiter, per_minute(10), 5, T0 + 6 * SECOND - 1) == 0
    assert await admitted(limiter, per_minute(10), 5, T0 + 6 * SECOND) == 1
    assert await admitted(limiter, per_minute(10), 10, T0 + 36 * SECOND) == 5
    assert await admitted(limiter, per_minute(10), 20, T0 + 10 * 60 * SECOND) == 10


async def test_any_window_of_one_period_admits_at_most_twice_the_limit_less_one(redis: Redis) -> None:
    # The docs once said exactly the limit: a burst, then the refill within the same period, is more.
    limiter, per_second = Limiter(redis), Check("w", 1, 10, 1)
    burst = await admitted(limiter, per_second, 11, T0)
    refill = [await admitted(limiter, per_second, 2, T0 + k * SECOND // 10) for k in range(1, 10)]
    assert (burst, refill) == (10, [1] * 9)  # 19 within 0.9 s: 2 x 10 - 1


async def test_reports_remaining_reset_and_wait(redis: Redis) -> None:
    limiter = Limiter(redis)
    (first,) = await limiter.decide([per_minute(10, hits=4)], T0)
    assert (first.admitted, first.remaining) == (True, 6)
    assert first.reset_s == 24.0  # four hits of 6 s each to give back
    (refused,) = await limiter.decide([per_minute(10, hits=7)], T0)
    assert (refused.admitted, refused.within, refused.remaining) == (False, False, 6)
    assert refused.wait_s == 6.0  # 4 + 7 = 11 hits: one step too many
    assert refused.wait_one_s == 0.0  # a single hit would fit now


async def test_hits_count_as_many(redis: Redis) -> None:
    limiter = Limiter(redis)
    assert (await limiter.decide([per_minute(1000, hits=999)], T0))[0].admitted
    assert not (await limiter.decide([per_minute(1000, hits=2)], T0))[0].admitted
    assert (await limiter.decide([per_minute(1000, hits=1)], T0))[0].admitted


async def test_refunds_give_budget_back(redis: Redis) -> None:
    limiter = Limiter(redis)
    await limiter.decide([per_minute(100, hits=100)], T0)
    assert not (await limiter.decide([per_minute(100, hits=30)], T0))[0].admitted
    (refund,) = await limiter.decide([per_minute(100, hits=40, mode=Mode.REFUND)], T0)
    assert refund.admitted and refund.remaining == 40
    assert (await limiter.decide([per_minute(100, hits=40)], T0))[0].admitted
    # Refunds never make the budget larger than the limit.
    await limiter.decide([per_minute(100, hits=1000, mode=Mode.REFUND)], T0)
    assert await admitted(limiter, per_minute(100), 150, T0) == 100


async def test_check_only_consumes_nothing(redis: Redis) -> None:
    limiter = Limiter(redis)
    await limiter.decide([per_minute(3, hits=3)], T0)
    (probe,) = await limiter.decide([per_minute(3, hits=0, mode=Mode.CHECK)], T0)
    assert probe.admitted and probe.remaining == 0  # at the limit is not over it
    assert await admitted(limiter, per_minute(3), 1, T0 + 20 * SECOND) == 1


async def test_a_refused_request_consumes_nothing_anywhere(redis: Redis) -> None:
    limiter = Limiter(redis)
    await limiter.decide([per_minute(2, key="full", hits=2)], T0)
    both = [per_minute(5, key="roomy"), per_minute(2, key="full")]
    decisions = await limiter.decide(both, T0)
    assert [d.admitted for d in decisions] == [True, False]
    (roomy,) = await limiter.decide([per_minute(5, key="roomy", hits=0, mode=Mode.CHECK)], T0)
    assert roomy.remaining == 5


async def test_shadow_mode_admits_but_says_it_was_over(redis: Redis) -> None:
    limiter = Limiter(redis)
    shadow = per_minute(2, shadow=True)
    results = [(await limiter.decide([shadow], T0))[0] for _ in range(3)]
    assert [r.admitted for r in results] == [True, True, True]
    assert [r.within for r in results] == [True, True, False]


async def test_shadow_mode_leaves_no_debt_for_enforcement_to_find(redis: Redis) -> None:
    # 300 hits on a 10-a-second rule in shadow mode, then enforcing: it refused the key for about 30 s.
    limiter = Limiter(redis)
    shadow, enforced = Check("s", 1, 10, 1, shadow=True), Check("s", 1, 10, 1)
    assert await admitted(limiter, shadow, 300, T0) == 300
    assert await admitted(limiter, enforced, 1, T0) == 0  # the 10 a second are spent, as enforcement would have
    assert await admitted(limiter, enforced, 10, T0 + SECOND) == 10  # and no more than that


async def test_keys_expire_once_refilled(redis: Redis) -> None:
    limiter = Limiter(redis)
    await limiter.decide([per_minute(60, key="ttl", hits=30)], T0)
    assert 0 < await redis.pttl("ttl") <= 30_001
