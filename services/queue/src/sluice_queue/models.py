"""What model inference serves, refreshed in the background so no request waits for it."""

from __future__ import annotations

import asyncio
import logging

import grpc

from sluice.inference.v1 import inference_pb2, inference_pb2_grpc

logger = logging.getLogger(__name__)

_RETRY_S = 1.0


class ModelDirectory:
    def __init__(self, inference: inference_pb2_grpc.InferenceAsyncStub, ttl_s: float) -> None:
        self._inference = inference
        self._ttl_s = ttl_s
        self.info: inference_pb2.ModelInfo | None = None

    @property
    def model_name(self) -> str:
        return self.info.model_name if self.info is not None else ""

    async def run(self) -> None:
        """Refresh forever: every ``ttl_s``, or every second until inference first answers."""
        while True:
            try:
                self.info = await self._inference.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                logger.debug("model info not available yet: %s", exc.details())
            await asyncio.sleep(self._ttl_s if self.info is not None else _RETRY_S)
