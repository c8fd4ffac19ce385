"""The whole stack (Envoy, inference replicas, queue) as real processes on free ports.

The shared stack's replicas run the simulated GPU engine: these tests are
about the request path (Envoy, the queue, limits, scheduling, cancellation,
traces), not the model, and it starts in seconds and keeps a steady pace.
``test_real_engine.py`` runs the stack on vLLM.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LOOPBACK, LocalStack, StackOptions, StackPorts

SLOTS_PER_REPLICA = 4
WAITING_PER_TENANT = 128
LIMITED_KEY = "e2e-limited"
LIMITED_PER_HOUR = 3
OPENAI_LIMITED_KEY = "openai-capped"
RATE_LIMITS = f"""
domain: sluice-edge
descriptors:
  - key: api_key
    value: anonymous
    descriptors:
      - key: method
        rate_limit: {{unit: second, requests_per_unit: 1000}}
  - key: api_key
    value: {LIMITED_KEY}
    descriptors:
      - key: method
        value: /sluice.generation.v1.Generation/Generate
        rate_limit: {{unit: hour, requests_per_unit: {LIMITED_PER_HOUR}}}
  - key: api_key
    value: {OPENAI_LIMITED_KEY}
    descriptors:
      - key: method
        value: /v1/completions
        rate_limit: {{unit: hour, requests_per_unit: {LIMITED_PER_HOUR}}}
"""


def stack_options(
    state_dir: Path, redis_server: RedisServer, postgres: PostgresServer, engine: Literal["vllm", "simulated"]
) -> StackOptions:
    limits = state_dir / "ratelimit.yaml"
    limits.write_text(RATE_LIMITS)
    return StackOptions(
        state_dir=state_dir,
        ports=StackPorts.free(replicas=2),
        redis_url=redis_server.url,
        database_url=postgres.url,
        ratelimit_config=(limits,),
        engine=engine,
        # Few slots, so that a handful of requests saturates the stack.
        inference_env={"SLUICE_INFERENCE_MAX_NUM_SEQS": str(SLOTS_PER_REPLICA)},
        queue_env={"SLUICE_QUEUE_MAX_WAITING_PER_TENANT": str(WAITING_PER_TENANT)},
    )


@pytest.fixture(scope="session")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, postgres: PostgresServer
) -> AsyncIterator[LocalStack]:
    """Two replicas of the simulated engine."""
    local = LocalStack(stack_options(tmp_path_factory.mktemp("stack"), redis_server, postgres, "simulated"))
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


def scraped(port: int, series: str) -> float:
    """The sum of a Prometheus endpoint's samples whose name and labels match the regex ``series``."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf"^{series} (\S+)$", text, re.M))


def requests_served(stack: LocalStack, index: int) -> float:
    """Requests a replica finished, from its Prometheus endpoint."""
    return scraped(stack.ports.inference_metrics[index], r"sluice_inference_requests_total\{[^}]*\}")


async def tenant_with_key(stack: LocalStack, name: str, tokens_per_minute: int = 0, weight: int = 1) -> tuple[str, str]:
    async with stack.channel(stack.internal) as channel:
        stub = datastore_pb2_grpc.DataStoreStub(channel)
        tenant = await stub.CreateTenant(
            datastore_pb2.CreateTenantRequest(
                name=name,
                tier=datastore_pb2.TIER_STANDARD,
                tokens_per_minute=tokens_per_minute,
                scheduling_weight=weight,
            )
        )
        key = (await stub.IssueApiKey(datastore_pb2.IssueApiKeyRequest(tenant_id=tenant.id))).api_key
    return str(tenant.id), str(key)
