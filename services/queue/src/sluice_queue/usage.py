"""Usage records for every request served, written by the data-access service in batches.

A finished request's record is written before its caller hears it finished
(``commit``): a queue replica killed a moment later loses nothing. Records
that arrive while a write is under way go together in the next one, so the
calls stay few however many requests finish (a group commit). Records of
requests that ended otherwise (cancelled, failed), and committed ones the
data-access service could not take in time, wait in memory and go out in
batches. When the data-access service is away they stay and are sent again
later: records are idempotent by request id, so a batch that was written but
not acknowledged is not counted twice. Only past ``max_buffered`` records does
the oldest go, counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from typing import Protocol

import grpc
from prometheus_client import Counter, Gauge

from sluice.datastore.v1 import datastore_pb2
from sluice_queue.flushing import Kept, flush_forever
from sluice_queue.ledger import Draft, Ledger

logger = logging.getLogger(__name__)

RECORDED = Counter("sluice_queue_usage_records", "Usage records by outcome (written, duplicate, dropped).", ["outcome"])
BUFFERED = Gauge("sluice_queue_usage_buffered", "Usage records waiting to be written.")

_RETRY_MAX_S = 5.0
# A commit's own call, not a caller's wait (``commit``'s timeout).
_COMMIT_TIMEOUT_S = 10.0
# Answers that a retry will not change.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class UsageStore(Protocol):
    """The data-access service's usage writes."""

    def RecordUsage(
        self, requests: Iterator[datastore_pb2.RecordUsageRequest], /, *, timeout: float
    ) -> Awaitable[datastore_pb2.RecordUsageResponse]: ...


class UsageRecorder:
    def __init__(
        self,
        datastore: UsageStore,
        batch_size: int = 200,
        interval_s: float = 0.5,
        max_buffered: int = 100_000,
        ledger: Ledger | None = None,
    ) -> None:
        self._datastore = datastore
        self._ledger = ledger
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._buffer: Kept[datastore_pb2.UsageRecord] = Kept(max_buffered, BUFFERED)
        self._max_buffered = max_buffered
        self._wake = asyncio.Event()
        self._committing: list[tuple[datastore_pb2.UsageRecord, asyncio.Future[bool]]] = []
        self._commit_due = asyncio.Event()

    def open(self, request_id: str, draft: Draft) -> None:
        """An engine took a request on: what ``draft()`` says it used so far is billed if this replica dies."""
        if self._ledger is not None:
            self._ledger.open(request_id, draft)

    async def commit(self, record: datastore_pb2.UsageRecord, timeout_s: float) -> bool:
        """Write ``record`` now; True once the data-access service has it. Otherwise (it is away, or
        slower than ``timeout_s``) the record is kept and written later, and False says so."""
        self._settle(record)
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._committing.append((record, written))
        self._commit_due.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(written)
        except TimeoutError:
            return False

    def record(self, record: datastore_pb2.UsageRecord) -> None:
        """Write ``record`` with the next batch."""
        self._settle(record)
        dropped = self._buffer.add(record)
        if dropped is not None:
            self._done([dropped])
            RECORDED.labels("dropped").inc()
            logger.error("usage buffer full (%d); dropped the oldest record", self._max_buffered)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def run(self) -> None:
        """Commit and flush forever: commits as they come, the rest every interval, or sooner when a batch
        is full, backing off while failing."""
        async with asyncio.TaskGroup() as jobs:
            jobs.create_task(flush_forever(self.flush, self._wake, self._interval_s, _RETRY_MAX_S))
            jobs.create_task(self._commit_forever())
            if self._ledger is not None:
                jobs.create_task(self._ledger.run(self.record))

    async def mirror(self) -> None:
        """Bring the drafts in Redis up to date (at shutdown, after the last flush: what is still owed is
        billed by another replica)."""
        if self._ledger is not None:
            await self._ledger.mirror()

    def _settle(self, record: datastore_pb2.UsageRecord) -> None:
        if self._ledger is not None:
            self._ledger.settle(record)

    def _done(self, records: list[datastore_pb2.UsageRecord]) -> None:
        if self._ledger is not None:
            self._ledger.done(r.request_id for r in records)

    async def _commit_forever(self) -> None:
        while True:
            await self._commit_due.wait()
            self._commit_due.clear()
            group, self._committing = self._committing[: self._batch_size], self._committing[self._batch_size :]
            if self._committing:
                self._commit_due.set()
            records = [record for record, _ in group]
            try:
                result = await self._datastore.RecordUsage(
                    iter([datastore_pb2.RecordUsageRequest(records=records)]), timeout=_COMMIT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning("usage not committed (%s %s); kept to write later", exc.code().name, exc.details())
                for record in records:
                    self.record(record)
                written = False
            else:
                self._written(records, result)
                written = True
            for _, future in group:
                if not future.done():
                    future.set_result(written)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Send what is buffered; False (records kept) if the data-access service failed."""
        while self._committing:  # at shutdown: commits not started yet go with the rest
            record, written = self._committing.pop()
            self.record(record)
            written.set_result(False)
        while self._buffer:
            batch = self._buffer.oldest(self._batch_size)
            try:
                result = await self._datastore.RecordUsage(
                    iter([datastore_pb2.RecordUsageRequest(records=batch)]), timeout=timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _REFUSED and len(batch) > 1:
                    # One bad record (its tenant deleted meanwhile, say) must not hold back the others.
                    self._batch_size, size = 1, self._batch_size
                    try:
                        return await self.flush(timeout_s)
                    finally:
                        self._batch_size = size
                if exc.code() in _REFUSED:
                    self._done(batch)
                    self._buffer.remove_oldest()
                    RECORDED.labels("dropped").inc()
                    logger.error("usage record %s refused: %s", batch[0].request_id, exc.details())
                    continue
                logger.warning(
                    "usage not recorded yet (%s %s); %d records kept", exc.code().name, exc.details(), len(self._buffer)
                )
                return False
            self._buffer.remove_oldest(len(batch))
            self._written(batch, result)
        return True

    def _written(self, records: list[datastore_pb2.UsageRecord], result: datastore_pb2.RecordUsageResponse) -> None:
        RECORDED.labels("written").inc(result.recorded)
        RECORDED.labels("duplicate").inc(result.duplicates)
        self._done(records)
