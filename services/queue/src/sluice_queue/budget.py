"""Per-tenant budgets through the rate-limit service: reserve before generating, settle after.

A request reserves, for its tenant, one request and prompt + max_tokens
tokens per minute (its limits from the data-access service; 0 is no limit).
The prompt's token count is not known before the replica tokenizes it, so
the reservation counts one token per byte of prompt text, an upper bound
for byte-level tokenizers (every token stands for at least one byte); the
end of the stream refunds what was not used. A caller that goes away is
charged for what it was sent. Refunds are gathered for ``refund_interval_s``
and sent together, one call for every tenant's: a call per request would
cost the rate-limit service as much again as the reservations, and land in
the middle of the next request's start.

If the rate-limit service cannot be reached, the request goes ahead (fail
open, as Envoy's own limits do) and the failure is logged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import wrappers_pb2

from envoy_api.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy_api.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy_api.envoy.type.v3 import ratelimit_unit_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import ResourceExhausted

logger = logging.getLogger(__name__)

# Bytes of chat template around each message, on top of its text.
_TEMPLATE_BYTES_PER_MESSAGE = 16

Descriptor = ratelimit_pb2.RateLimitDescriptor


@dataclass
class Reservation:
    tenant_id: str
    tokens_per_minute: int
    tokens: int  # reserved


def reserve_tokens(texts: list[str], max_tokens: int) -> int:
    """An upper bound of prompt + completion tokens."""
    return sum(len(t.encode()) + _TEMPLATE_BYTES_PER_MESSAGE for t in texts) + max_tokens


class Budgets:
    def __init__(
        self, ratelimit: rls_pb2_grpc.RateLimitServiceAsyncStub, domain: str, refund_interval_s: float = 0.1
    ) -> None:
        self._ratelimit = ratelimit
        self._domain = domain
        self._refund_interval_s = refund_interval_s
        # Tokens to give back, by tenant and its limit (the rate-limit service keys a budget by both).
        self._refunds: dict[tuple[str, int], int] = {}
        self._refunding = asyncio.Event()
        self._sending: asyncio.Future[None] | None = None

    async def reserve(self, tenant: datastore_pb2.Tenant, tokens: int, timeout_s: float | None) -> Reservation | None:
        """Take the request's share of the tenant's budgets; RESOURCE_EXHAUSTED when over one."""
        descriptors = []
        if tenant.requests_per_minute:
            descriptors.append(_descriptor("tenant_requests", tenant.id, tenant.requests_per_minute, 1))
        if tenant.tokens_per_minute:
            descriptors.append(_descriptor("tenant_tokens", tenant.id, tenant.tokens_per_minute, tokens))
        if not descriptors:
            return None
        request = rls_pb2.RateLimitRequest(domain=self._domain, descriptors=descriptors)
        try:
            response = await self._ratelimit.ShouldRateLimit(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "budget not checked (rate-limit service: %s %s); letting the request through",
                exc.code().name,
                exc.details(),
            )
            return None
        if response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
            retry = max(
                (s.duration_until_reset.ToNanoseconds() / 1e9 for s in response.statuses if s.code == 2), default=1.0
            )
            headers = {h.key: h.value for h in response.response_headers_to_add}
            if "Retry-After" in headers:
                retry = float(headers["Retry-After"])
            over = [d.entries[0].key for d, s in zip(descriptors, response.statuses, strict=True) if s.code == 2]
            what = " and ".join("requests" if k == "tenant_requests" else "tokens" for k in over)
            raise ResourceExhausted(f"over the tenant's {what} per minute; retry in {retry:.0f} s", retry_after_s=retry)
        return Reservation(tenant.id, tenant.tokens_per_minute, tokens) if tenant.tokens_per_minute else None

    def settle(self, reservation: Reservation, used: int) -> None:
        """Give back, with the next refunds, what was reserved but not used."""
        unused = reservation.tokens - used
        if unused > 0:
            key = (reservation.tenant_id, reservation.tokens_per_minute)
            self._refunds[key] = self._refunds.get(key, 0) + unused
            self._refunding.set()

    async def run(self) -> None:
        """Send the refunds gathered each interval, until cancelled (then call ``close``)."""
        while True:
            await self._refunding.wait()
            await asyncio.sleep(self._refund_interval_s)
            # A refund cut off half-way could not be sent again (it may have been applied): it finishes.
            self._sending = asyncio.ensure_future(self._refund())
            await asyncio.shield(self._sending)

    async def close(self) -> None:
        """Send what is still to be refunded (at shutdown)."""
        if self._sending is not None:
            await self._sending
        await self._refund()

    async def _refund(self) -> None:
        self._refunding.clear()
        refunds, self._refunds = self._refunds, {}
        if not refunds:
            return
        descriptors = []
        for (tenant_id, per_minute), tokens in refunds.items():
            refund = _descriptor("tenant_tokens", tenant_id, per_minute, tokens)
            refund.is_negative_hits = True
            descriptors.append(refund)
        try:
            await self._ratelimit.ShouldRateLimit(
                rls_pb2.RateLimitRequest(domain=self._domain, descriptors=descriptors), timeout=5.0
            )
        except grpc.aio.AioRpcError as exc:
            # Not sent again: a call that timed out may have been applied, and a refund twice is a gift.
            logger.warning(
                "could not refund %d tokens to %d tenants: %s", sum(refunds.values()), len(refunds), exc.code().name
            )


def _descriptor(key: str, tenant_id: str, per_minute: int, hits: int) -> Descriptor:
    return Descriptor(
        entries=[Descriptor.Entry(key=key, value=tenant_id)],
        limit=Descriptor.RateLimitOverride(requests_per_unit=per_minute, unit=ratelimit_unit_pb2.MINUTE),
        hits_addend=wrappers_pb2.UInt64Value(value=hits),
    )
