"""Per-tenant budgets through the rate-limit service: reserve before generating, settle after.

A request reserves, for its tenant, one request and prompt + max_tokens
tokens per minute (its limits from the data-access service; 0 is no limit).
The prompt's token count is not known before the replica tokenizes it, so
the reservation counts one token per byte of prompt text, an upper bound
for byte-level tokenizers (every token stands for at least one byte); the
end of the stream refunds what was not used. A caller that goes away is
charged for what it was sent.

If the rate-limit service cannot be reached, the request goes ahead (fail
open, as Envoy's own limits do) and the failure is logged.
"""

from __future__ import annotations

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
    def __init__(self, ratelimit: rls_pb2_grpc.RateLimitServiceAsyncStub, domain: str) -> None:
        self._ratelimit = ratelimit
        self._domain = domain

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

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Give back what was reserved but not used."""
        unused = reservation.tokens - used
        if unused <= 0:
            return
        refund = _descriptor("tenant_tokens", reservation.tenant_id, reservation.tokens_per_minute, unused)
        refund.is_negative_hits = True
        try:
            await self._ratelimit.ShouldRateLimit(
                rls_pb2.RateLimitRequest(domain=self._domain, descriptors=[refund]), timeout=5.0
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "could not refund %d tokens to tenant %s: %s", unused, reservation.tenant_id, exc.code().name
            )


def _descriptor(key: str, tenant_id: str, per_minute: int, hits: int) -> Descriptor:
    return Descriptor(
        entries=[Descriptor.Entry(key=key, value=tenant_id)],
        limit=Descriptor.RateLimitOverride(requests_per_unit=per_minute, unit=ratelimit_unit_pb2.MINUTE),
        hits_addend=wrappers_pb2.UInt64Value(value=hits),
    )
