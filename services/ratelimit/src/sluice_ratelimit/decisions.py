"""From a ``ShouldRateLimit`` request to its answer: match, check, decide all or nothing.

Each descriptor is matched against its domain's rules; its hits come from the
request's ``hits_addend`` (0 counts as 1) or from the descriptor's own (0 only
checks). A descriptor's ``limit`` replaces the configured one, enforced even
where the rule is in shadow mode, and only in a configured domain (as the
reference service does: no domain, no limits). A named limit
listed in another matched limit's ``replaces`` is dropped. Then every
remaining limit is checked in one Redis script call: if any would be
exceeded, the answer is OVER_LIMIT and nothing is consumed anywhere.

A descriptor's own ``hits_addend`` is a *charge*, recorded whatever is
decided, into debt past the limit if need be (``Mode.CHARGE``). Envoy sets it
from a rate-limit action's ``hits_addend``, how its users charge a cost: when
a stream is done (``apply_on_stream_done``, after a 0-hit check on the
request), a charge that went unrecorded because the key was full would make
such limits never apply. Plain request counting keeps all or nothing, so a
caller over its rate still gets its limit's worth through.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from google.protobuf import duration_pb2
from prometheus_client import Counter

from envoy_api.envoy.config.core.v3 import base_pb2
from envoy_api.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy_api.envoy.service.ratelimit.v3 import rls_pb2
from sluice_core.errors import FieldViolation, InvalidArgument, Unavailable
from sluice_core.logs import RateLimitedLogger
from sluice_ratelimit.config import OVERRIDE_UNITS, UNIT_PROTO, Config, Domain, Limit, Rule
from sluice_ratelimit.limiter import Check, Decision, Limiter, Mode
from sluice_ratelimit.overlimit_cache import OverLimitCache

logger = logging.getLogger(__name__)

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
UNLIMITED_REMAINING = 2**32 - 1
_ERROR_LOG_INTERVAL_S = 10.0


class _Metrics:
    """Per rule (the configured path that matched), like envoyproxy/ratelimit's stats."""

    def __init__(self) -> None:
        labels = ["domain", "rule"]
        self.total_hits = Counter("sluice_ratelimit_total_hits", "Hits asked for.", labels)
        self.within_limit = Counter("sluice_ratelimit_within_limit", "Hits admitted.", labels)
        self.near_limit = Counter("sluice_ratelimit_near_limit", "Hits admitted past the near-limit share.", labels)
        self.over_limit = Counter("sluice_ratelimit_over_limit", "Hits refused.", labels)
        self.shadow_mode = Counter("sluice_ratelimit_shadow_mode", "Hits over a shadow-mode limit (admitted).", labels)
        self.redis_error = Counter("sluice_ratelimit_redis_error", "Hits decided without Redis (it failed).", labels)


METRICS = _Metrics()


@dataclass
class _Plan:
    """One request descriptor: what applies and what to check."""

    rule: Rule | None
    limits: list[Limit]
    hits: int
    mode: Mode
    checks: list[Check]
    path: str
    shadow: bool


@dataclass(frozen=True)
class Policy:
    key_prefix: str = "sluice:rl:"
    fail_closed: bool = False
    near_limit_ratio: float = 0.8


class Decider:
    def __init__(
        self,
        config: Callable[[], Config],
        limiter: Limiter,
        policy: Policy,
        cache: OverLimitCache | None = None,
    ) -> None:
        self._config = config
        self._limiter = limiter
        self._policy = policy
        self._cache = cache
        # At most one line per interval: a Redis outage must not flood the log.
        self._redis_errors = RateLimitedLogger(logger, _ERROR_LOG_INTERVAL_S)

    async def decide(self, request: rls_pb2.RateLimitRequest, now_us: int | None = None) -> rls_pb2.RateLimitResponse:
        _validate(request)
        domain = self._config().domains.get(request.domain)
        plans = [self._plan(request, d, domain) for d in request.descriptors]
        _apply_replaces(plans)
        checks = [c for p in plans for c in p.checks]
        decisions = await self._cached_refusal(request.domain, plans, checks, now_us)
        from_redis = decisions is None
        if decisions is None and checks:
            decisions = await self._ask_redis(request.domain, plans, checks, now_us)
        return self._respond(request.domain, plans, decisions, from_redis)

    def _plan(
        self, request: rls_pb2.RateLimitRequest, descriptor: ratelimit_pb2.RateLimitDescriptor, domain: Domain | None
    ) -> _Plan:
        rule = domain.match(_entries(descriptor)) if domain is not None else None
        if descriptor.HasField("hits_addend"):
            hits = descriptor.hits_addend.value
            mode = Mode.CHECK if hits == 0 else Mode.CHARGE
        else:
            hits, mode = max(1, request.hits_addend), Mode.CONSUME
        limits = list(rule.limits) if rule is not None and not rule.unlimited else []
        shadow = rule.shadow_mode if rule is not None else False
        if descriptor.HasField("limit") and domain is not None:
            limits, shadow = [_override(descriptor.limit)], False
        base = self._policy.key_prefix + request.domain + "|" + "|".join(f"{k}={v}" for k, v in _entries(descriptor))
        checks = [
            Check(
                f"{base}|{limit.requests_per_unit}/{limit.unit}",
                limit.period_s,
                limit.requests_per_unit,
                hits,  # 0 for a check: its wait is until the key is within its limit again
                mode,
                shadow,
            )
            for limit in limits
        ]
        path = rule.path if rule is not None else ("override" if limits else "")
        return _Plan(rule, limits, hits, mode, checks, path, shadow)

    async def _cached_refusal(
        self, domain: str, plans: list[_Plan], checks: list[Check], now_us: int | None
    ) -> list[Decision] | None:
        """Refuse without consuming anything when a key is known to be over its limit (nothing would be consumed
        anyway). Where the other keys stand is still asked of Redis, without charging them (one call, only
        for requests with other keys); while Redis fails they are reported with nothing left."""
        if self._cache is None or any(c.mode == Mode.CHARGE for c in checks):
            return None  # a charge is recorded whatever is decided
        waits = [self._cache.over_for(c.key) if c.mode == Mode.CONSUME and not c.shadow else 0.0 for c in checks]
        if not any(waits):
            return None
        # A descriptor with a key known over shows that one; the others show where they stand.
        over = {c.key for c, wait in zip(checks, waits, strict=True) if wait}
        shown_over = {c.key for p in plans if any(k.key in over for k in p.checks) for c in p.checks}
        others = [replace(c, mode=Mode.CHECK) for c in checks if c.key not in shown_over]
        standing = iter((await self._ask_redis(domain, plans, others, now_us) if others else None) or [])
        unknown = Decision(admitted=True, remaining=0, reset_s=0, wait_s=0, wait_one_s=0, within=True)
        return [
            Decision(admitted=False, remaining=0, reset_s=w, wait_s=w, wait_one_s=w, within=False)
            if w
            else unknown
            if c.key in shown_over
            else next(standing, unknown)
            for c, w in zip(checks, waits, strict=True)
        ]

    async def _ask_redis(
        self, domain: str, plans: list[_Plan], checks: list[Check], now_us: int | None
    ) -> list[Decision] | None:
        try:
            decisions = await self._limiter.decide(checks, now_us)
        except Exception as exc:
            for plan in plans:
                if plan.checks:
                    METRICS.redis_error.labels(domain, plan.path).inc(plan.hits)
            self._log_redis_error(exc)
            if self._policy.fail_closed:
                raise Unavailable("the rate-limit store is unavailable", retry_after_s=1.0) from exc
            return None
        if self._cache is not None:
            for check, decision in zip(checks, decisions, strict=True):
                if not decision.admitted:
                    self._cache.remember(check.key, decision.wait_one_s)
        return decisions

    def _log_redis_error(self, exc: Exception) -> None:
        mode = "refusing (fail closed)" if self._policy.fail_closed else "allowing (fail open)"
        self._redis_errors.error("Redis failed (%s: %s); %s until it is back", type(exc).__name__, exc, mode)

    def _respond(
        self, domain: str, plans: list[_Plan], decisions: list[Decision] | None, from_redis: bool
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=OK)
        remaining = iter(decisions or [])
        over: list[tuple[Limit, Decision, int]] = []
        for plan in plans:
            status = response.statuses.add(code=OK)
            if plan.rule is not None and plan.rule.unlimited and not plan.limits:
                status.limit_remaining = UNLIMITED_REMAINING
                continue
            if not plan.limits:
                continue
            if decisions is None:  # Redis failed and we fail open: say what applies, nothing more
                _describe(status, plan.limits[0])
                continue
            mine = [(limit, next(remaining)) for limit in plan.limits]
            self._count(domain, plan, mine, from_redis)
            refused = [(lim, d) for lim, d in mine if not d.admitted]
            tightest = min(mine, key=lambda pair: pair[1].remaining)
            shown = refused[0] if refused else tightest
            _describe(status, shown[0], shown[1])
            if refused:
                status.code = OVER_LIMIT
                over.extend((lim, d, plan.hits) for lim, d in refused)
                if not _hopeless(shown[0], plan.hits):
                    # When the caller may try again, as Retry-After says (Envoy's x-ratelimit-reset is
                    # this): not when the key is full again, which grows with every hit.
                    status.duration_until_reset.CopyFrom(_duration(retry_after_s(shown[1])))
        if over:
            response.overall_code = OVER_LIMIT
            _add_headers(response, over)
        return response

    def _count(self, domain: str, plan: _Plan, mine: list[tuple[Limit, Decision]], from_redis: bool) -> None:
        labels = (domain, plan.path)
        METRICS.total_hits.labels(*labels).inc(plan.hits)
        if any(not d.within for _, d in mine):
            counter = METRICS.shadow_mode if plan.shadow else METRICS.over_limit
            counter.labels(*labels).inc(plan.hits)
            return
        if not from_redis:
            return  # refused because of another descriptor known to be over; this one was not checked
        METRICS.within_limit.labels(*labels).inc(plan.hits)
        if any(d.remaining < lim.requests_per_unit * (1 - self._policy.near_limit_ratio) for lim, d in mine):
            METRICS.near_limit.labels(*labels).inc(plan.hits)


def _entries(descriptor: ratelimit_pb2.RateLimitDescriptor) -> list[tuple[str, str]]:
    return [(e.key, e.value) for e in descriptor.entries]


def _validate(request: rls_pb2.RateLimitRequest) -> None:
    violations: list[FieldViolation] = []
    if not request.domain:
        violations.append(FieldViolation("domain", "must not be empty"))
    if not request.descriptors:
        violations.append(FieldViolation("descriptors", "must hold at least one descriptor"))
    for i, descriptor in enumerate(request.descriptors):
        if not descriptor.entries:
            violations.append(FieldViolation(f"descriptors[{i}].entries", "must hold at least one entry"))
        for j, entry in enumerate(descriptor.entries):
            if not entry.key:
                violations.append(FieldViolation(f"descriptors[{i}].entries[{j}].key", "must not be empty"))
        if descriptor.HasField("limit"):
            if descriptor.limit.unit not in OVERRIDE_UNITS:
                violations.append(FieldViolation(f"descriptors[{i}].limit.unit", "must be SECOND ... YEAR"))
    if violations:
        raise InvalidArgument(violations)


def _override(limit: ratelimit_pb2.RateLimitDescriptor.RateLimitOverride) -> Limit:
    return Limit(limit.requests_per_unit, OVERRIDE_UNITS[limit.unit])


def _apply_replaces(plans: Sequence[_Plan]) -> None:
    replaced = set().union(*(p.rule.replaces for p in plans if p.rule is not None))
    if not replaced:
        return
    for plan in plans:
        keep = [i for i, limit in enumerate(plan.limits) if not (limit.name and limit.name in replaced)]
        plan.limits = [plan.limits[i] for i in keep]
        plan.checks = [plan.checks[i] for i in keep]


def _describe(
    status: rls_pb2.RateLimitResponse.DescriptorStatus, limit: Limit, decision: Decision | None = None
) -> None:
    status.current_limit.CopyFrom(
        rls_pb2.RateLimitResponse.RateLimit(
            name=limit.name,
            requests_per_unit=limit.requests_per_unit,
            unit=UNIT_PROTO[limit.unit],  # type: ignore[arg-type]
        )
    )
    if decision is not None:
        status.limit_remaining = decision.remaining
        status.duration_until_reset.CopyFrom(_duration(decision.reset_s))


def _hopeless(limit: Limit, hits: int) -> bool:
    """Whether no wait would let these hits through: a limit of 0 (a block list), or fewer than the hits."""
    return limit.requests_per_unit == 0 or hits > limit.requests_per_unit


def retry_after_s(decision: Decision) -> int:
    """Whole seconds until a refused request's hits fit (HTTP's Retry-After is whole seconds)."""
    return math.ceil(decision.wait_s)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _add_headers(response: rls_pb2.RateLimitResponse, over: list[tuple[Limit, Decision, int]]) -> None:
    limit = min((lim for lim, _, _ in over), key=lambda lim: lim.requests_per_unit)
    headers = [("RateLimit-Limit", str(limit.requests_per_unit)), ("RateLimit-Remaining", "0")]
    never = [(lim, hits) for lim, _, hits in over if _hopeless(lim, hits)]
    if never:
        # Blocked, or more hits than the limit holds at all: no wait would help, so no hint to wait.
        lim, hits = never[0]
        message = (
            f"blocked: the rate limit is 0 per {lim.unit}"
            if lim.requests_per_unit == 0
            else f"asks for {hits} at once, more than the rate limit of {lim.requests_per_unit} per {lim.unit}"
        )
    else:
        retry_after = max(retry_after_s(d) for _, d, _ in over)
        headers += [("RateLimit-Reset", str(retry_after)), ("Retry-After", str(retry_after))]
        message = f"over the rate limit of {limit.requests_per_unit} per {limit.unit}; retry in {retry_after} s"
    for key, value in headers:
        response.response_headers_to_add.append(base_pb2.HeaderValue(key=key, value=value))
    # Envoy sends this as the refusal's message (grpc-message for gRPC callers).
    response.raw_body = message.encode()
