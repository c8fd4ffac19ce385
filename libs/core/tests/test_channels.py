"""The shared client channel: what it retries when a handler answers UNAVAILABLE."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from envoy_api.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_core.channels import insecure_channel

Context = grpc.aio.ServicerContext[Any, Any]


class Away(datastore_pb2_grpc.DataStoreServicer, rls_pb2_grpc.RateLimitServiceServicer):
    """Every handler counts its call, then answers UNAVAILABLE (after doing its work, say)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def _away(self, name: str, context: Context) -> None:
        self.calls[name] += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "away")

    async def GetTenantByApiKey(self, request: datastore_pb2.GetTenantByApiKeyRequest, context: Context) -> Any:
        await self._away("GetTenantByApiKey", context)

    async def IssueApiKey(self, request: datastore_pb2.IssueApiKeyRequest, context: Context) -> Any:
        await self._away("IssueApiKey", context)

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: Context) -> Any:
        await self._away("ShouldRateLimit", context)


class AwayGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self, away: Away) -> None:
        self._away = away

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        await self._away._away("Generate", context)
        yield generation_pb2.GenerateEvent()  # never reached


@pytest.fixture
async def away() -> AsyncIterator[tuple[Away, str]]:
    servicer = Away()  # type: ignore[abstract]
    server = grpc.aio.server()
    datastore_pb2_grpc.add_DataStoreServicer_to_server(servicer, server)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    generation_pb2_grpc.add_GenerationServicer_to_server(AwayGeneration(servicer), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_only_calls_safe_to_run_twice_are_retried(away: tuple[Away, str]) -> None:
    servicer, target = away
    async with insecure_channel(target) as channel:
        datastore: datastore_pb2_grpc.DataStoreAsyncStub = datastore_pb2_grpc.DataStoreStub(channel)
        ratelimit: rls_pb2_grpc.RateLimitServiceAsyncStub = rls_pb2_grpc.RateLimitServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await datastore.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key="k"))
        with pytest.raises(grpc.aio.AioRpcError):
            await datastore.IssueApiKey(datastore_pb2.IssueApiKeyRequest(tenant_id="t"))
        with pytest.raises(grpc.aio.AioRpcError):
            await ratelimit.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="d"))
        generation: generation_pb2_grpc.GenerationAsyncStub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in generation.Generate(generation_pb2.GenerateRequest(prompt="p")):
                pass
    # A read is tried again; a key issued or hits counted twice would be wrong. A generation is
    # retried by Envoy alone: tried here too, one call reached the queue up to nine times.
    assert servicer.calls == {"GetTenantByApiKey": 3, "IssueApiKey": 1, "ShouldRateLimit": 1, "Generate": 1}
