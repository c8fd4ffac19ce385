"""``envoy.service.ratelimit.v3.RateLimitService``: what Envoy's rate-limit filter calls."""

from __future__ import annotations

from typing import Any

import grpc

from envoy_api.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from sluice_ratelimit.decisions import Decider


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        return await self._decider.decide(request)
