"""``sluice-queue``: serve the public Generation API."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from envoy_api.envoy.service.ratelimit.v3 import rls_pb2_grpc
from sluice.datastore.v1 import datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2_grpc
from sluice.inference.v1 import inference_pb2_grpc
from sluice_core.channels import insecure_channel
from sluice_core.logs import setup_logging
from sluice_core.server import GrpcServer
from sluice_core.telemetry import setup_tracing, shutdown_tracing
from sluice_queue import SERVICE_NAME
from sluice_queue.admission import Admission
from sluice_queue.auth import Authenticator
from sluice_queue.budget import Budgets
from sluice_queue.conversations import Conversations
from sluice_queue.models import ModelDirectory
from sluice_queue.servicer import GenerationServicer
from sluice_queue.settings import QueueSettings
from sluice_queue.usage import UsageRecorder

logger = logging.getLogger(__name__)


async def serve(settings: QueueSettings) -> None:
    channels = {
        target: insecure_channel(target)
        for target in {settings.inference_target, settings.datastore_target, settings.ratelimit_target}
    }
    inference = inference_pb2_grpc.InferenceStub(channels[settings.inference_target])
    datastore = datastore_pb2_grpc.DataStoreStub(channels[settings.datastore_target])
    ratelimit = rls_pb2_grpc.RateLimitServiceStub(channels[settings.ratelimit_target])
    admission = Admission(settings.max_in_flight, settings.max_waiting, settings.retry_after_s)
    models = ModelDirectory(inference, settings.model_info_ttl_s)
    usage = UsageRecorder(datastore, settings.usage_batch_size, settings.usage_flush_interval_s)
    servicer = GenerationServicer(
        inference,
        admission,
        models,
        Authenticator(datastore),
        Budgets(ratelimit, settings.budget_domain),
        Conversations(datastore),
        usage,
    )
    server = GrpcServer(settings, health_names=[SERVICE_NAME])
    server.add(generation_pb2_grpc.add_GenerationServicer_to_server, servicer, SERVICE_NAME)
    tasks = [asyncio.create_task(models.run()), asyncio.create_task(usage.run())]
    try:
        async with server:
            await server.set_serving(True)
            await server.wait_for_stop()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Nothing in flight is dropped: refunds and appends finish, usage is written.
        await servicer.drain()
        if not await usage.flush():
            logger.error("%d usage records could not be written before shutdown", usage.pending)
        for channel in channels.values():
            await channel.close()


def main() -> None:
    settings = QueueSettings()
    setup_logging("queue", settings.log_level, settings.log_format)
    setup_tracing("sluice-queue", settings.replica_id, settings.otlp_endpoint)
    try:
        asyncio.run(serve(settings))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
