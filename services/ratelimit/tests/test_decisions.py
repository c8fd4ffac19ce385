"""ShouldRateLimit answers: rules, hits, charges, overrides, replaces, shadow mode, headers, the local cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2
from redis.asyncio import Redis

from envoy_api.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy_api.envoy.service.ratelimit.v3 import rls_pb2
from envoy_api.envoy.type.v3 import ratelimit_unit_pb2
from sluice_core.errors import InvalidArgument
from sluice_ratelimit.config import Config, parse
from sluice_ratelimit.decisions import OK, OVER_LIMIT, UNLIMITED_REMAINING, Decider, Policy
from sluice_ratelimit.limiter import Limiter
from sluice_ratelimit.overlimit_cache import OverLimitCache

T0 = 1_800_000_000_000_000
CONFIG = """
domain: edge
descriptors:
  - key: api_key
    rate_limits:
      - {unit: minute, requests_per_unit: 5, name: per-minute}
      - {unit: day, requests_per_unit: 8, name: per-day}
  - key: tenant
    rate_limit: {unit: hour, requests_per_unit: 1000, name: tokens}
  - key: free
    rate_limit: {unlimited: true}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: vip
    rate_limit: {unit: minute, requests_per_unit: 100, replaces: [{name: per-minute}]}
  - key: service
    rate_limit: {unit: minute, requests_per_unit: 2}
"""


def decider(redis: Redis, cache: OverLimitCache | None = None) -> Decider:
    config = Config({"edge": parse(CONFIG, Path("edge.yaml"))}, ())
    return Decider(lambda: config, Limiter(redis, timeout_s=1.0), Policy(), cache)


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    """A descriptor; ``hits`` is its own hits_addend (0 checks, more is a charge)."""
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


def request(*descriptors: ratelimit_pb2.RateLimitDescriptor, hits: int = 0) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain="edge", descriptors=descriptors, hits_addend=hits)


async def test_several_limits_on_one_descriptor(redis: Redis) -> None:
    limits = decider(redis)
    answers = [await limits.decide(request(descriptor(("api_key", "a"))), T0) for _ in range(6)]
    assert [a.overall_code for a in answers] == [OK] * 5 + [OVER_LIMIT]
    # The per-minute limit refills; the per-day one (8) then stops the 9th.
    later = [await limits.decide(request(descriptor(("api_key", "a"))), T0 + 60_000_000) for _ in range(5)]
    assert [a.overall_code for a in later] == [OK] * 3 + [OVER_LIMIT] * 2
    status = later[-1].statuses[0]
    assert status.code == OVER_LIMIT and status.current_limit.name == "per-day"


async def test_every_answer_has_a_code_and_one_status_per_descriptor(redis: Redis) -> None:
    answer = await decider(redis).decide(
        request(descriptor(("api_key", "b")), descriptor(("unknown", "x")), descriptor(("free", "y"))), T0
    )
    assert answer.overall_code == OK
    assert [s.code for s in answer.statuses] == [OK, OK, OK]
    limited, unmatched, unlimited = answer.statuses
    assert (limited.current_limit.requests_per_unit, limited.limit_remaining) == (5, 4)
    assert limited.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE
    assert not unmatched.HasField("current_limit")
    assert unlimited.limit_remaining == UNLIMITED_REMAINING
    unknown_domain = await decider(redis).decide(
        rls_pb2.RateLimitRequest(domain="nope", descriptors=[descriptor(("a", "b"))])
    )
    assert unknown_domain.overall_code == OK and len(unknown_domain.statuses) == 1


async def test_over_limit_answers_carry_rate_limit_headers(redis: Redis) -> None:
    limits = decider(redis)
    for _ in range(5):
        await limits.decide(request(descriptor(("api_key", "c"))), T0)
    answer = await limits.decide(request(descriptor(("api_key", "c"))), T0)
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert headers == {"RateLimit-Limit": "5", "RateLimit-Remaining": "0", "RateLimit-Reset": "12", "Retry-After": "12"}


async def test_more_hits_than_the_limit_holds_get_no_hint_to_wait(redis: Redis) -> None:
    answer = await decider(redis).decide(request(descriptor(("api_key", "h")), hits=10), T0)
    assert answer.overall_code == OVER_LIMIT
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert "Retry-After" not in headers and headers["RateLimit-Limit"] == "5"
    assert answer.raw_body.decode() == "asks for 10 at once, more than the rate limit of 5 per minute"


async def test_a_charge_past_the_limit_is_recorded_as_debt_that_later_checks_see(redis: Redis) -> None:
    # Envoy charges a finished stream's cost this way; a charge that did not fit was dropped whole,
    # so the key never went past full and a later 0-hit check always passed.
    limits = decider(redis)
    tenant = ("tenant", "t1")  # 1000 an hour: one hit every 3.6 s
    assert (await limits.decide(request(descriptor(tenant), hits=900), T0)).overall_code == OK
    charged = await limits.decide(request(descriptor(tenant, hits=200)), T0)
    assert charged.overall_code == OVER_LIMIT and charged.statuses[0].limit_remaining == 0
    assert (await limits.decide(request(descriptor(tenant, hits=0)), T0)).overall_code == OVER_LIMIT
    # 100 hits past full: checks pass again once 100 hits' worth (360 s) has refilled, and not before.
    assert (await limits.decide(request(descriptor(tenant, hits=0)), T0 + 359_000_000)).overall_code == OVER_LIMIT
    assert (await limits.decide(request(descriptor(tenant, hits=0)), T0 + 360_000_000)).overall_code == OK


async def test_charging_when_a_stream_is_done_limits_as_upstreams_token_quota_does(redis: Redis) -> None:
    # envoyproxy/ratelimit's integration-test/scripts/token-quota.sh: a 0-hit check on the request,
    # a charge of 1 when the stream is done, 2 a minute: the first three pass, the fourth is refused.
    limits = decider(redis)
    service = ("service", "service_2")
    passed = []
    for _ in range(4):
        check = await limits.decide(request(descriptor(service, hits=0)), T0)
        passed.append(check.overall_code == OK)
        if passed[-1]:
            await limits.decide(request(descriptor(service, hits=1)), T0)
    assert passed == [True, True, True, False]
    # GCRA refills one hit every 30 s (upstream's window starts afresh after the minute).
    assert (await limits.decide(request(descriptor(service, hits=0)), T0 + 30_000_000)).overall_code == OK


async def test_a_charge_owes_at_most_one_period_past_full(redis: Redis) -> None:
    # As a fixed window forgets at its end: one huge charge must not lock a key out for hours.
    limits = decider(redis)
    key = ("service", "huge")  # 2 a minute: one hit every 30 s
    assert (await limits.decide(request(descriptor(key, hits=1000)), T0)).overall_code == OVER_LIMIT
    assert (await limits.decide(request(descriptor(key)), T0 + 60_000_000)).overall_code == OVER_LIMIT
    assert (await limits.decide(request(descriptor(key)), T0 + 90_000_000)).overall_code == OK


async def test_a_descriptor_limit_overrides_the_configured_one(redis: Redis) -> None:
    limits = decider(redis)
    d = descriptor(("tenant", "t2"))
    d.limit.CopyFrom(
        ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=2, unit=ratelimit_unit_pb2.MINUTE)
    )
    answers = [await limits.decide(request(d), T0) for _ in range(3)]
    assert [a.overall_code for a in answers] == [OK, OK, OVER_LIMIT]
    assert answers[0].statuses[0].current_limit.requests_per_unit == 2
    # Enforced on a shadow-mode rule too, and, as the reference does, only in a configured domain.
    shadowed = descriptor(("trial", "t2"))
    shadowed.limit.CopyFrom(d.limit)
    answers = [await limits.decide(request(shadowed), T0) for _ in range(3)]
    assert [a.overall_code for a in answers] == [OK, OK, OVER_LIMIT]
    elsewhere = rls_pb2.RateLimitRequest(domain="unconfigured", descriptors=[d])
    answers = [await limits.decide(elsewhere, T0) for _ in range(3)]
    assert [a.overall_code for a in answers] == [OK, OK, OK]
    assert not answers[0].statuses[0].HasField("current_limit")


async def test_a_limit_of_zero_refuses_everything_and_charges_nothing(redis: Redis) -> None:
    # Upstream's block list; an override of 0 was INVALID_ARGUMENT, which Envoy's fail-open turned into an allow.
    limits = decider(redis)
    blocked = descriptor(("tenant", "t0"))
    blocked.limit.CopyFrom(
        ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=0, unit=ratelimit_unit_pb2.MINUTE)
    )
    for hits in (1, 0):  # a charge, and a check
        blocked.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
        answer = await limits.decide(request(blocked, descriptor(("api_key", "z"))), T0)
        assert answer.overall_code == OVER_LIMIT
        assert answer.raw_body.decode() == "blocked: the rate limit is 0 per minute"
        assert "Retry-After" not in {h.key for h in answer.response_headers_to_add}
    free = await limits.decide(request(descriptor(("api_key", "z"))), T0)
    assert free.statuses[0].limit_remaining == 4  # of 5 a minute: the refused requests charged it nothing


async def test_replaces_drops_the_named_limit(redis: Redis) -> None:
    limits = decider(redis)
    both = request(descriptor(("api_key", "d")), descriptor(("vip", "d")))
    answers = [await limits.decide(both, T0) for _ in range(8)]
    # per-minute (5) is replaced by vip's 100/minute; per-day (8) still counts.
    assert all(a.overall_code == OK for a in answers)
    assert (await limits.decide(both, T0)).overall_code == OVER_LIMIT


async def test_shadow_mode_never_refuses(redis: Redis) -> None:
    limits = decider(redis)
    answers = [await limits.decide(request(descriptor(("trial", "t"))), T0) for _ in range(3)]
    assert all(a.overall_code == OK for a in answers)


async def test_all_or_nothing_across_descriptors_except_charges(redis: Redis) -> None:
    limits = decider(redis)
    for _ in range(5):
        await limits.decide(request(descriptor(("api_key", "e"))), T0)
    answer = await limits.decide(request(descriptor(("tenant", "t3")), descriptor(("api_key", "e"))), T0)
    assert answer.overall_code == OVER_LIMIT
    assert [s.code for s in answer.statuses] == [OK, OVER_LIMIT]
    probe = await limits.decide(request(descriptor(("tenant", "t3"), hits=0)), T0)
    assert probe.statuses[0].limit_remaining == 1000  # the tenant was not counted
    # A charge is for work done: it counts whatever else the request met.
    await limits.decide(request(descriptor(("tenant", "t3"), hits=10), descriptor(("api_key", "e"))), T0)
    probe = await limits.decide(request(descriptor(("tenant", "t3"), hits=0)), T0)
    assert probe.statuses[0].limit_remaining == 990


async def test_keys_known_over_are_answered_without_redis(redis: Redis) -> None:
    limits = decider(redis, OverLimitCache())
    for _ in range(6):
        await limits.decide(request(descriptor(("api_key", "f"))))
    await redis.config_resetstat()
    answer = await limits.decide(request(descriptor(("api_key", "f"))))
    assert answer.overall_code == OVER_LIMIT
    stats = await redis.info("commandstats")
    assert "cmdstat_evalsha" not in stats


async def test_a_charge_to_a_key_known_over_is_still_recorded(redis: Redis) -> None:
    limits = decider(redis, OverLimitCache())
    for _ in range(6):
        await limits.decide(request(descriptor(("api_key", "k"))), T0)
    await redis.config_resetstat()
    await limits.decide(request(descriptor(("api_key", "k"), hits=1)), T0)
    assert "cmdstat_evalsha" in await redis.info("commandstats")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (rls_pb2.RateLimitRequest(descriptors=[descriptor(("a", "b"))]), "domain"),
        (rls_pb2.RateLimitRequest(domain="edge"), "descriptors"),
        (rls_pb2.RateLimitRequest(domain="edge", descriptors=[descriptor()]), "descriptors[0].entries"),
        (rls_pb2.RateLimitRequest(domain="edge", descriptors=[descriptor(("", "b"))]), "descriptors[0].entries[0].key"),
    ],
)
async def test_bad_requests_name_the_field(redis: Redis, bad: rls_pb2.RateLimitRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await decider(redis).decide(bad)
    assert caught.value.violations[0].field == field


async def test_a_refusal_from_the_cache_reports_where_the_other_limits_stand(redis: Redis) -> None:
    limits = decider(redis, OverLimitCache())
    for _ in range(6):
        await limits.decide(request(descriptor(("api_key", "g"))))
    await limits.decide(request(descriptor(("tenant", "g")), hits=10))
    answer = await limits.decide(request(descriptor(("api_key", "g")), descriptor(("tenant", "g"))))
    assert answer.overall_code == OVER_LIMIT
    key, tenant = answer.statuses
    assert key.code == OVER_LIMIT and key.limit_remaining == 0 and key.duration_until_reset.ToNanoseconds() > 0
    # It said 0 left, with no duration: the tenant had 990 of its 1000 an hour, and still has.
    assert tenant.code == OK and tenant.limit_remaining == 990
    assert tenant.duration_until_reset.ToNanoseconds() > 0
    again = await limits.decide(request(descriptor(("tenant", "g"), hits=0)))
    assert again.statuses[0].limit_remaining == 990  # the refused request charged nothing


async def test_a_refusals_reset_is_when_to_retry_and_agrees_with_its_headers(redis: Redis) -> None:
    limits = decider(redis)
    for _ in range(5):
        await limits.decide(request(descriptor(("api_key", "h"))), now_us=T0)
    refused = await limits.decide(request(descriptor(("api_key", "h"))), now_us=T0)
    assert refused.overall_code == OVER_LIMIT
    headers = {h.key: h.value for h in refused.response_headers_to_add}
    # 5 a minute, all spent at once: one more fits 12 s later. It said 60 s (the key full again),
    # more after each hit, while Retry-After said 12.
    assert headers["Retry-After"] == headers["RateLimit-Reset"] == "12"
    assert refused.statuses[0].duration_until_reset.ToSeconds() == 12
