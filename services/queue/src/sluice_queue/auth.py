"""Who is calling: an API key from the call's metadata, its tenant from the data-access service.

Tenants are kept in this process for at most a second, so that a hot key
costs no round trip while a revoked key still stops working within about a
second (the data-access service drops its own caches at once). A key used in
the second half of that second is looked up again in the background, so that
a key in steady use never makes a call wait for its lookup.

When the data-access service cannot answer (PostgreSQL stalled or down, the
service away), a key known in the last ``stale_s`` is served as it was then,
as HTTP caches serve stale-if-error: no key can be revoked meanwhile either,
since revoking writes to the same database. A key not known that recently is
refused UNAVAILABLE with a retry hint, within ``timeout_s``, not the caller's
whole deadline.

At most ``max_lookups`` lookups run at once: keys no one issued (random keys
pass the edge's per-key limit, each being a key of its own) cannot load the
data-access service and PostgreSQL beyond that. A lookup waits for a turn
within the same ``timeout_s``; past it the key is handled as in an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import grpc
from prometheus_client import Counter

from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import Unauthenticated, Unavailable
from sluice_core.logs import RateLimitedLogger

logger = logging.getLogger(__name__)

# The longest key the data-access service looks up (its keys are far shorter).
MAX_API_KEY_CHARS = 256
_ONE_CREDENTIAL = "send one credential: 'x-api-key: <key>' or 'authorization: Bearer <key>', not several"

_TTL_S = 1.0
_PRUNE_AT = 10_000

STALE = Counter("sluice_queue_auth_stale", "Calls let in on a tenant known before the data-access service failed.")

Metadata = Iterable[tuple[str, str | bytes]]


class TenantStore(Protocol):
    """The data-access service's key lookup."""

    def GetTenantByApiKey(
        self, request: datastore_pb2.GetTenantByApiKeyRequest, /, *, timeout: float
    ) -> Awaitable[datastore_pb2.Tenant]: ...


def api_key_from(metadata: Metadata | None) -> str | None:
    """The caller's one credential: ``x-api-key: <key>`` or ``authorization: Bearer <key>``.

    More than one (two keys, or a key and an authorization header) is refused
    UNAUTHENTICATED, as Envoy's edge refuses it: were one taken, a later
    change on either side could make the key a call is rate-limited as differ
    from the key it is billed as.
    """
    credentials = [
        (key, value.decode() if isinstance(value, bytes) else value)
        for key, value in metadata or ()
        if key in ("x-api-key", "authorization") and value
    ]
    if len(credentials) > 1:
        raise Unauthenticated(_ONE_CREDENTIAL)
    if not credentials:
        return None
    key, text = credentials[0]
    if key == "x-api-key":
        return text
    if text[:7].lower() != "bearer ":
        return None
    return text[7:].strip() or None


class Authenticator:
    def __init__(
        self,
        datastore: TenantStore,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout_s: float = 1.0,
        stale_s: float = 300.0,
        max_lookups: int = 64,
    ) -> None:
        self._datastore = datastore
        self._clock = clock
        # A lookup is shared by every call waiting for the key: no one call's deadline bounds it.
        self._timeout_s = timeout_s
        self._stale_s = stale_s
        self._lookups = asyncio.Semaphore(max_lookups)
        self._known: dict[str, tuple[float, datastore_pb2.Tenant]] = {}  # each key's expiry and tenant
        self._inflight: dict[str, asyncio.Task[datastore_pb2.Tenant]] = {}
        self._log = RateLimitedLogger(logger, clock=clock)

    async def tenant(self, metadata: Metadata | None) -> datastore_pb2.Tenant:
        api_key = api_key_from(metadata)
        if api_key is None:
            raise Unauthenticated("no API key: send it as 'authorization: Bearer <key>' or 'x-api-key: <key>'")
        if len(api_key) > MAX_API_KEY_CHARS:
            raise Unauthenticated(f"malformed API key: longer than any key ({MAX_API_KEY_CHARS} characters)")
        now = self._clock()
        known = self._known.get(api_key)
        if known is not None and known[0] > now:
            if known[0] - now < _TTL_S / 2 and api_key not in self._inflight:
                self._start_lookup(api_key)
            return known[1]
        # Concurrent first calls with one key share one lookup.
        if api_key not in self._inflight:
            self._start_lookup(api_key)
        return await asyncio.shield(self._inflight[api_key])

    def _start_lookup(self, api_key: str) -> None:
        task = asyncio.ensure_future(self._lookup(api_key))
        self._inflight[api_key] = task
        task.add_done_callback(lambda _: self._inflight.pop(api_key, None))
        # A refresh ahead has no caller to raise to; a call waiting on it sees the error itself.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _lookup(self, api_key: str) -> datastore_pb2.Tenant:
        try:
            async with asyncio.timeout(self._timeout_s), self._lookups:
                tenant = await self._datastore.GetTenantByApiKey(
                    datastore_pb2.GetTenantByApiKeyRequest(api_key=api_key), timeout=self._timeout_s
                )
        except TimeoutError:
            return self._stale(api_key, "no turn to look keys up (too many at once)")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self._known.pop(api_key, None)
                raise Unauthenticated("unknown or revoked API key") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # The data-access service's field is not the caller's: the key is what is wrong.
                raise Unauthenticated("malformed API key") from None
            return self._stale(api_key, f"data-access service: {exc.code().name} {exc.details()}")
        now = self._clock()
        if len(self._known) >= _PRUNE_AT:
            self._known = {k: v for k, v in self._known.items() if v[0] + self._stale_s > now}
        self._known[api_key] = (now + _TTL_S, tenant)
        return tenant

    def _stale(self, api_key: str, why: str) -> datastore_pb2.Tenant:
        """The key's tenant as last known, if recently enough; else UNAVAILABLE."""
        now = self._clock()
        self._log.warning("API keys not looked up (%s)", why)
        known = self._known.get(api_key)
        if known is not None and known[0] + self._stale_s > now:
            STALE.inc()
            return known[1]
        raise Unavailable("API keys cannot be checked now; retry shortly", retry_after_s=1.0) from None
