"""Usage a replica still owes, mirrored in Redis, so that another replica bills it if this one dies.

Every request an engine took on here has a draft of its usage record in Redis,
brought up to date every ``interval_s`` with what it has been sent so far,
under a lease this replica renews; new drafts go out at once (one call for
all that arrive while the last one was under way). Once a request's record
has been written to the data-access service its draft goes. A replica that
dies stops renewing: once its leases run out, another replica claims the
drafts and owes them as its own (writes them, renews them meanwhile, then
deletes them). Records are idempotent by request id, so a draft written
twice (claimed by two replicas, or written by its own replica as well) is
still one row, and the first write wins.

A replica that could not reach Redis itself claims nothing until it has
reached it again for a whole lease: an outage stops every replica's renewals
alike, and the owners must be given the chance to renew theirs first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sluice.datastore.v1 import datastore_pb2
from sluice_core.logs import RateLimitedLogger
from sluice_core.service import raise_if_cancelled, woken

logger = logging.getLogger(__name__)

Draft = Callable[[], datastore_pb2.UsageRecord]

# KEYS[1] is the prefix. ARGV: operation, lease_ms, then
#   mirror  n_gone gone_id... (id record)...   drafts written and leased, the gone deleted
#   claim   limit                               expired drafts, leased to the caller
_SCRIPT = """
local drafts, due = KEYS[1] .. ':usage:drafts', KEYS[1] .. ':usage:due'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease_ms = tonumber(ARGV[2])
if ARGV[1] == 'mirror' then
  local gone = tonumber(ARGV[3])
  for i = 4, 3 + gone do
    redis.call('HDEL', drafts, ARGV[i])
    redis.call('ZREM', due, ARGV[i])
  end
  for i = 4 + gone, #ARGV, 2 do
    redis.call('HSET', drafts, ARGV[i], ARGV[i + 1])
    redis.call('ZADD', due, now + lease_ms, ARGV[i])
  end
  redis.call('PEXPIRE', drafts, 86400000)
  redis.call('PEXPIRE', due, 86400000)
  return {}
end
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local record = redis.call('HGET', drafts, id)
  if record then
    redis.call('ZADD', due, now + lease_ms, id)
    out[#out + 1] = record
  else
    redis.call('ZREM', due, id)
  end
end
return out
"""


class Ledger:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        interval_s: float = 1.0,
        lease_s: float = 3.0,
        claim_limit: int = 200,
    ) -> None:
        self._script = redis.register_script(_SCRIPT)
        self._prefix = prefix
        self._interval_s = interval_s
        self._lease_ms = int(lease_s * 1e3)
        self._claim_limit = claim_limit
        self._drafts: dict[str, Draft] = {}
        self._new: set[str] = set()
        self._gone: set[str] = set()
        self._wake = asyncio.Event()
        self._log = RateLimitedLogger(logger)  # an outage fails every update
        # Redis last failed here (or this replica started): no claims for a lease after it.
        self._failed_at = time.monotonic()

    def open(self, request_id: str, draft: Draft) -> None:
        """Mirror ``draft()`` (what the request has used so far) until its record is written."""
        self._drafts[request_id] = draft
        self._new.add(request_id)
        self._wake.set()

    def settle(self, record: datastore_pb2.UsageRecord) -> None:
        """The request's record is final: mirrored as it is until written."""
        if record.request_id in self._drafts:
            self._drafts[record.request_id] = lambda: record

    def done(self, request_ids: Iterable[str]) -> None:
        """These records need no draft any more (written, or refused by the data-access service)."""
        for request_id in request_ids:
            if self._drafts.pop(request_id, None) is not None:
                self._new.discard(request_id)
                self._gone.add(request_id)

    async def run(self, owe: Callable[[datastore_pb2.UsageRecord], None]) -> None:
        """Mirror new drafts at once and all of them every interval; claim the dead's and ``owe`` each. Until
        cancelled."""
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            raise_if_cancelled()
            await woken(self._wake, max(0.0, next_full - loop.time()))
            self._wake.clear()
            if loop.time() < next_full:
                await self.mirror(only_new=True)
                continue
            next_full = loop.time() + self._interval_s
            await self.mirror()
            for record in await self.claim():
                owe(record)

    async def mirror(self, only_new: bool = False) -> None:
        """Write drafts (the new ones, or all) to Redis and renew their leases; delete those written."""
        ids = list(self._new) if only_new else list(self._drafts)
        gone = list(self._gone)
        if not ids and not gone:
            return
        pairs = [value for i in ids for value in (i, self._drafts[i]().SerializeToString())]
        try:
            await self._script(keys=[self._prefix], args=["mirror", self._lease_ms, len(gone), *gone, *pairs])
        except RedisError as exc:
            raise_if_cancelled()
            self._failed_at = time.monotonic()
            self._log.warning("usage drafts not mirrored (%s); retrying", exc)
            return
        self._new.difference_update(ids)
        self._gone.difference_update(gone)

    async def claim(self) -> list[datastore_pb2.UsageRecord]:
        """The drafts of replicas that stopped renewing them, now owed (and renewed) by this one."""
        if time.monotonic() - self._failed_at < self._lease_ms / 1e3:
            return []
        try:
            found = await self._script(keys=[self._prefix], args=["claim", self._lease_ms, self._claim_limit])
        except RedisError as exc:
            raise_if_cancelled()
            self._failed_at = time.monotonic()
            self._log.warning("could not look for other replicas' usage drafts (%s)", exc)
            return []
        assert isinstance(found, list)
        records = [datastore_pb2.UsageRecord.FromString(blob) for blob in found]
        for record in records:
            self._drafts[record.request_id] = lambda record=record: record  # type: ignore[misc]
        if records:
            logger.warning("billing %d requests of a queue replica that stopped: %s", len(records), _ids(records))
        return records


def _ids(records: list[datastore_pb2.UsageRecord], shown: int = 5) -> str:
    ids = ", ".join(r.request_id for r in records[:shown])
    return ids + (f" and {len(records) - shown} more" if len(records) > shown else "")
