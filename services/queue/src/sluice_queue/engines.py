"""The inference replicas behind Envoy: what model they serve and how many slots they have.

Envoy balances every probe, so one round of a few concurrent ``GetModelInfo``
calls reaches each replica with high probability; replicas busy enough to be
skipped by least-request balancing are still seen through the streams they
finish (``seen``). The scheduler's capacity is the sum of the slots of the
replicas seen recently; one that stops being seen drops out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc

from sluice.inference.v1 import inference_pb2
from sluice_core.service import raise_if_cancelled

logger = logging.getLogger(__name__)

Report = Callable[[dict[str, int]], Awaitable[int]]


class ModelInfoSource(Protocol):
    """The inference replicas' probe."""

    def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, /, *, timeout: float
    ) -> Awaitable[inference_pb2.ModelInfo]: ...


class Engines:
    def __init__(self, inference: ModelInfoSource, report: Report, interval_s: float, probes: int) -> None:
        self._inference = inference
        self._report = report
        self._interval_s = interval_s
        self._probes = probes
        self._slots: dict[str, int] = {}
        self._seen: set[str] = set()
        self.info: inference_pb2.ModelInfo | None = None

    @property
    def model_name(self) -> str:
        return self.info.model_name if self.info is not None else ""

    @property
    def max_model_len(self) -> int:
        """The model's context length in tokens (0 until a replica has answered)."""
        return self.info.max_model_len if self.info is not None else 0

    def seen(self, replica_id: str) -> None:
        """A replica just finished a stream: it is alive."""
        self._seen.add(replica_id)

    async def run(self) -> None:
        """Probe and report every ``interval_s`` until cancelled."""
        capacity = -1
        while True:
            answers = await asyncio.gather(*(self._probe() for _ in range(self._probes)))
            for info in answers:
                if info is not None:
                    self.info = info
                    self._slots[info.replica_id] = info.slots
                    self._seen.add(info.replica_id)
            alive = {replica: self._slots[replica] for replica in self._seen if replica in self._slots}
            self._seen.clear()
            try:
                total = await self._report(alive)
            except Exception as exc:
                raise_if_cancelled()
                logger.warning("could not report inference capacity: %s", exc)
            else:
                if total != capacity:
                    logger.info("inference capacity: %d slots", total)
                    capacity = total
            await asyncio.sleep(self._interval_s)

    async def _probe(self) -> inference_pb2.ModelInfo | None:
        try:
            return await self._inference.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            logger.debug("no inference replica answered: %s", exc.details())
            return None
