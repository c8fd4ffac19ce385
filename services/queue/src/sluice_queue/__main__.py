"""``sluice-queue``: serve the public Generation API."""

from __future__ import annotations

import asyncio
import contextlib

from sluice.generation.v1 import generation_pb2_grpc
from sluice.inference.v1 import inference_pb2_grpc
from sluice_core.channels import insecure_channel
from sluice_core.logs import setup_logging
from sluice_core.server import GrpcServer
from sluice_core.telemetry import setup_tracing, shutdown_tracing
from sluice_queue import SERVICE_NAME
from sluice_queue.admission import Admission
from sluice_queue.models import ModelDirectory
from sluice_queue.servicer import GenerationServicer
from sluice_queue.settings import QueueSettings


async def serve(settings: QueueSettings) -> None:
    channel = insecure_channel(settings.inference_target)
    inference = inference_pb2_grpc.InferenceStub(channel)
    admission = Admission(settings.max_in_flight, settings.max_waiting, settings.retry_after_s)
    models = ModelDirectory(inference, settings.model_info_ttl_s)
    server = GrpcServer(settings, health_names=[SERVICE_NAME])
    server.add(
        generation_pb2_grpc.add_GenerationServicer_to_server,
        GenerationServicer(inference, admission, models),
        SERVICE_NAME,
    )
    refresher = asyncio.create_task(models.run())
    try:
        async with server:
            await server.set_serving(True)
            await server.wait_for_stop()
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
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
