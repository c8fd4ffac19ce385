"""Usage records survive a data-access service that is briefly away, and one bad record holds back nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from sluice.datastore.v1 import datastore_pb2
from sluice_queue.usage import UsageRecorder


class FlakyDataStore:
    """Stands in for the data-access stub: fails while ``away``, refuses the request ids in ``refused``."""

    def __init__(self) -> None:
        self.away = False
        self.refused: set[str] = set()
        self.written: list[str] = []
        self.calls = 0
        self.answer = asyncio.Event()
        self.answer.set()

    async def RecordUsage(
        self,
        requests: Iterable[datastore_pb2.RecordUsageRequest],
        timeout: float,  # noqa: ASYNC109 - the stub's
    ) -> datastore_pb2.RecordUsageResponse:
        records = [r for request in requests for r in request.records]
        self.calls += 1
        await self.answer.wait()
        if self.away:
            raise _error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
        if any(r.request_id in self.refused for r in records):
            raise _error(grpc.StatusCode.NOT_FOUND, "unknown tenant")
        self.written += [r.request_id for r in records]
        return datastore_pb2.RecordUsageResponse(recorded=len(records))


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def record(request_id: str) -> datastore_pb2.UsageRecord:
    return datastore_pb2.UsageRecord(request_id=request_id, tenant_id="t", completion_tokens=3)


@pytest.fixture
def datastore() -> FlakyDataStore:
    return FlakyDataStore()


async def test_records_wait_while_the_datastore_is_away_then_all_go(datastore: FlakyDataStore) -> None:
    usage = UsageRecorder(datastore, batch_size=2)
    datastore.away = True
    for i in range(5):
        usage.record(record(f"r{i}"))
    assert not await usage.flush()
    assert usage.pending == 5
    datastore.away = False
    assert await usage.flush()
    assert datastore.written == [f"r{i}" for i in range(5)]
    assert usage.pending == 0


async def test_a_refused_record_does_not_hold_back_the_others(datastore: FlakyDataStore) -> None:
    usage = UsageRecorder(datastore, batch_size=10)
    datastore.refused = {"bad"}
    for request_id in ("a", "bad", "b"):
        usage.record(record(request_id))
    assert await usage.flush()
    assert datastore.written == ["a", "b"]


@contextlib.asynccontextmanager
async def running(usage: UsageRecorder) -> AsyncIterator[UsageRecorder]:
    task = asyncio.create_task(usage.run())
    try:
        yield usage
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_records_committed_together_go_in_one_write(datastore: FlakyDataStore) -> None:
    async with running(UsageRecorder(datastore, interval_s=60)) as usage:
        done = await asyncio.gather(*(usage.commit(record(f"r{i}"), timeout_s=5) for i in range(20)))
    assert done == [True] * 20
    assert sorted(datastore.written) == sorted(f"r{i}" for i in range(20))
    assert datastore.calls <= 2  # the first alone, then everything that came while it was written


async def test_a_commit_the_datastore_cannot_take_is_kept_and_written_later(datastore: FlakyDataStore) -> None:
    async with running(UsageRecorder(datastore, interval_s=60)) as usage:
        datastore.away = True
        assert not await usage.commit(record("away"), timeout_s=5)
        datastore.away, datastore.answer = False, asyncio.Event()  # back, but slow
        assert not await usage.commit(record("slow"), timeout_s=0.05)
        datastore.answer.set()
        assert await usage.flush()
    assert sorted(datastore.written) == ["away", "slow"]
