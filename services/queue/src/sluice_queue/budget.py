"""Per-tenant budgets through the rate-limit service's Budgets API: reserve before generating, settle after.

A request reserves, for its tenant, one request and prompt + max_tokens
tokens per minute (its limits from the data-access service; 0 is no limit).
The prompt's token count is not known before the replica tokenizes it, so
the reservation counts one token per byte of prompt text, an upper bound
for byte-level tokenizers (every token stands for at least one byte), and at
most the model's context; the end of the stream gives back what was not
used. A caller that goes away is charged for what it was sent.

A call to the rate-limit service per request cost as much time to first
token as all the rest of the queue's work (docs/scheduling.md, step 4). So
a replica reserves ahead: when a
tenant's *allowance* here cannot cover a request, one call reserves the
request's share plus ``lease_s`` seconds' worth of the tenant's limits, and
the next requests draw on that allowance without a call. What a request did
not use goes back into the allowance (anything beyond one lease goes back to
the rate-limit service). An allowance unused for ``idle_s`` goes back to the
rate-limit service, so a tenant is charged exactly what it used once it is
idle, and at any time at most one lease ahead per queue replica. A tenant
whose remaining budget cannot cover the lease gets an exact reservation for
the request alone, and is refused only when that does not fit: refusals and
their retry hints are as exact as before, except that up to one lease of
the tenant's budget may sit in another replica's allowance for ``idle_s``.
Budgets too small for a lease to hold a request are reserved per request.
Give-backs are gathered for ``refund_interval_s`` and sent in one call; one
that no rate-limit service took (UNAVAILABLE) is sent again with the next,
for up to a minute (the period of the budgets it belongs to).

A reservation waits at most ``timeout_s`` for the rate-limit service (a
request's first token waits for it). If the service cannot answer in time,
the request goes ahead unchecked (fail open, as Envoy's own limits do), or
with ``fail_closed`` is refused UNAVAILABLE with a retry hint; either way
``sluice_queue_budget_unchecked_total`` counts it and a warning is logged at
most once a second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import Counter

from sluice.datastore.v1 import datastore_pb2
from sluice.ratelimit.v1 import budgets_pb2
from sluice_core.errors import ResourceExhausted, Unavailable
from sluice_core.logs import RateLimitedLogger
from sluice_core.messages import TEMPLATE_CHARS_PER_MESSAGE

logger = logging.getLogger(__name__)

UNCHECKED = Counter(
    "sluice_queue_budget_unchecked",
    "Budgeted requests whose budget the rate-limit service could not check in time, by what was done.",
    ["action"],
)

_REQUESTS, _TOKENS = "tenant_requests", "tenant_tokens"
_PERIOD_S = 60  # budgets are per minute
# A give-back older than the period would go to a later minute's budget.
_REFUND_WITHIN_S = float(_PERIOD_S)


class BudgetsApi(Protocol):
    """The rate-limit service's Budgets calls."""

    def Reserve(
        self, request: budgets_pb2.ReserveRequest, /, *, timeout: float
    ) -> Awaitable[budgets_pb2.ReserveResponse]: ...

    def Refund(
        self, request: budgets_pb2.RefundRequest, /, *, timeout: float
    ) -> Awaitable[budgets_pb2.RefundResponse]: ...


@dataclass(frozen=True)
class Limits:
    """A tenant's budgets; the rate-limit service keys a budget by its name, the tenant and its limit."""

    tenant_id: str
    requests_per_minute: int
    tokens_per_minute: int


@dataclass
class Hits:
    requests: int = 0
    tokens: int = 0

    def covers(self, other: Hits) -> bool:
        return self.requests >= other.requests and self.tokens >= other.tokens

    def __add__(self, other: Hits) -> Hits:
        return Hits(self.requests + other.requests, self.tokens + other.tokens)


@dataclass
class Reservation:
    limits: Limits
    tokens: int  # reserved


@dataclass
class _Allowance:
    held: Hits
    used_at: float


def reserve_tokens(texts: list[str], max_tokens: int, context: int) -> int:
    """An upper bound of prompt + completion tokens: at most the model's ``context`` (0: not known yet).

    Inference cuts a conversation's history to fit the context, so a long one
    costs no more than that; counted in bytes, it could exceed the tenant's
    whole budget and be refused forever.
    """
    estimate = sum(len(t.encode()) + TEMPLATE_CHARS_PER_MESSAGE for t in texts) + max_tokens
    return min(estimate, context) if context else estimate


class Budgets:
    def __init__(
        self,
        ratelimit: BudgetsApi,
        lease_s: float = 3.0,
        idle_s: float = 1.0,
        refund_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout_s: float = 0.25,
        fail_closed: bool = False,
    ) -> None:
        self._ratelimit = ratelimit
        self._timeout_s = timeout_s
        self._fail_closed = fail_closed
        self._log = RateLimitedLogger(logger, clock=clock)
        self._lease_s = lease_s
        self._idle_s = idle_s
        self._refund_interval_s = refund_interval_s
        self._clock = clock
        self._allowances: dict[Limits, _Allowance] = {}
        self._refunds: dict[Limits, Hits] = {}
        self._owed_since = math.inf  # when the oldest give-back not yet sent was due
        self._due = asyncio.Event()
        self._sending: asyncio.Future[None] | None = None

    async def reserve(self, tenant: datastore_pb2.Tenant, tokens: int, timeout_s: float | None) -> Reservation | None:
        """Take the request's share of the tenant's budgets; RESOURCE_EXHAUSTED when over one."""
        limits = Limits(tenant.id, tenant.requests_per_minute, tenant.tokens_per_minute)
        if not limits.requests_per_minute and not limits.tokens_per_minute:
            return None
        if tokens > limits.tokens_per_minute > 0:
            # No retry hint: waiting would not help.
            raise ResourceExhausted(
                f"this request may take {tokens} tokens (prompt and max_tokens), more than its tenant's "
                f"budget of {limits.tokens_per_minute} tokens a minute; lower max_tokens or shorten the prompt"
            )
        need = Hits(1 if limits.requests_per_minute else 0, tokens if limits.tokens_per_minute else 0)
        reservation = Reservation(limits, tokens) if limits.tokens_per_minute else None
        allowance = self._allowances.get(limits)
        if allowance is not None and allowance.held.covers(need):
            allowance.held.requests -= need.requests
            allowance.held.tokens -= need.tokens
            allowance.used_at = self._clock()
            return reservation
        lease = self._lease(limits)
        if lease.covers(need):
            response = await self._call(limits, need + lease, timeout_s)
            if response is None:
                return None
            if response.reserved:
                self._hold(limits, lease)
                return reservation
        # Too little left for a lease (or too small a budget for one): this request alone.
        response = await self._call(limits, need, timeout_s)
        if response is None:
            return None
        if not response.reserved:
            raise _refusal(limits, response)
        return reservation

    def settle(self, reservation: Reservation, used: int) -> None:
        """Keep what was reserved but not used for the tenant's next requests (the excess goes back)."""
        unused = reservation.tokens - used
        if unused > 0:
            self._hold(reservation.limits, Hits(tokens=unused))

    def _lease(self, limits: Limits) -> Hits:
        share = self._lease_s / 60
        return Hits(int(limits.requests_per_minute * share), int(limits.tokens_per_minute * share))

    def _hold(self, limits: Limits, hits: Hits) -> None:
        """Add to the tenant's allowance here, up to one lease; give back the rest."""
        lease = self._lease(limits)
        allowance = self._allowances.setdefault(limits, _Allowance(Hits(), 0.0))
        allowance.used_at = self._clock()
        held = allowance.held
        held.requests += hits.requests
        held.tokens += hits.tokens
        excess = Hits(max(0, held.requests - lease.requests), max(0, held.tokens - lease.tokens))
        held.requests -= excess.requests
        held.tokens -= excess.tokens
        self._give_back(limits, excess)
        self._due.set()

    def _give_back(self, limits: Limits, hits: Hits) -> None:
        if hits.requests or hits.tokens:
            self._owed_since = min(self._owed_since, self._clock())
            refund = self._refunds.setdefault(limits, Hits())
            refund.requests += hits.requests
            refund.tokens += hits.tokens

    async def _call(self, limits: Limits, hits: Hits, timeout_s: float | None) -> budgets_pb2.ReserveResponse | None:
        """The rate-limit service's answer to reserving ``hits``; None (logged) if it cannot answer."""
        request = budgets_pb2.ReserveRequest(budgets=_budgets(limits, hits))
        timeout = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        try:
            response: budgets_pb2.ReserveResponse = await self._ratelimit.Reserve(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            UNCHECKED.labels("refused" if self._fail_closed else "let through").inc()
            self._warn(exc)
            if self._fail_closed:
                raise Unavailable(
                    "the tenant's budget cannot be checked now; retry shortly", retry_after_s=1.0
                ) from None
            return None
        return response

    def _warn(self, exc: grpc.aio.AioRpcError) -> None:
        what = "refusing budgeted requests" if self._fail_closed else "letting budgeted requests through"
        self._log.warning("budgets not checked (rate-limit service: %s %s); %s", exc.code().name, exc.details(), what)

    async def run(self) -> None:
        """Every interval, give back idle allowances and what was gathered, until cancelled (then ``close``)."""
        while True:
            await self._due.wait()
            await asyncio.sleep(self._refund_interval_s)
            now = self._clock()
            for limits, allowance in list(self._allowances.items()):
                if now - allowance.used_at >= self._idle_s:
                    del self._allowances[limits]
                    self._give_back(limits, allowance.held)
            if not self._allowances and not self._refunds:
                self._due.clear()
            # A give-back cut off half-way could not be sent again (it may have been applied): it finishes.
            self._sending = asyncio.ensure_future(self._refund())
            await asyncio.shield(self._sending)

    async def close(self) -> None:
        """Give back every allowance and what is still gathered (at shutdown)."""
        if self._sending is not None:
            await self._sending
        for limits, allowance in self._allowances.items():
            self._give_back(limits, allowance.held)
        self._allowances.clear()
        await self._refund()
        if self._refunds:
            tokens = sum(h.tokens for h in self._refunds.values())
            logger.warning("could not give back %d tokens to %d tenants at shutdown", tokens, len(self._refunds))

    async def _refund(self) -> None:
        refunds, self._refunds = self._refunds, {}
        since, self._owed_since = self._owed_since, math.inf
        if not refunds:
            return
        budgets = [b for limits, hits in refunds.items() for b in _budgets(limits, hits, refund=True)]
        try:
            await self._ratelimit.Refund(budgets_pb2.RefundRequest(budgets=budgets), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and self._clock() - since < _REFUND_WITHIN_S:
                # Not taken (no rate-limit service, or its Redis failed): sent again with the next
                # give-backs, while the minute it was charged in may still run.
                for limits, hits in refunds.items():
                    self._give_back(limits, hits)
                self._owed_since = min(self._owed_since, since)
                self._due.set()
                return
            # Not sent again: a call that timed out may have been applied, and a refund twice is a gift;
            # one older than a budget's minute would go to a later minute.
            logger.warning(
                "could not give back %d tokens to %d tenants: %s",
                sum(h.tokens for h in refunds.values()),
                len(refunds),
                exc.code().name,
            )


def _refusal(limits: Limits, response: budgets_pb2.ReserveResponse) -> ResourceExhausted:
    keys = [key for key, per_minute in _keyed(limits) if per_minute]
    over = [(key, s) for key, s in zip(keys, response.standings, strict=True) if not s.fits]
    retry = max((s.retry_after.ToNanoseconds() / 1e9 for _, s in over), default=1.0)
    what = " and ".join("requests" if key == _REQUESTS else "tokens" for key, _ in over)
    return ResourceExhausted(f"over the tenant's {what} per minute; retry in {retry:.0f} s", retry_after_s=retry)


def _keyed(limits: Limits) -> tuple[tuple[str, int], tuple[str, int]]:
    return (_REQUESTS, limits.requests_per_minute), (_TOKENS, limits.tokens_per_minute)


def _budgets(limits: Limits, hits: Hits, refund: bool = False) -> list[budgets_pb2.Budget]:
    # A refund names only what it gives back; a reservation checks every limit.
    return [
        budgets_pb2.Budget(name=key, owner=limits.tenant_id, limit=per_minute, period_s=_PERIOD_S, hits=n)
        for (key, per_minute), n in zip(_keyed(limits), (hits.requests, hits.tokens), strict=True)
        if per_minute and (n or not refund)
    ]
