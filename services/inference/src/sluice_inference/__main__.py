"""``sluice-inference``: serve one model replica."""

from __future__ import annotations

import asyncio

from sluice.inference.v1 import inference_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_core.service import cancel, run
from sluice_inference import SERVICE_NAME
from sluice_inference.host import ModelHost
from sluice_inference.servicer import InferenceServicer
from sluice_inference.settings import InferenceSettings


async def serve(settings: InferenceSettings) -> None:
    host = ModelHost(settings)
    server = GrpcServer(settings, health_names=[SERVICE_NAME])
    server.add(
        inference_pb2_grpc.add_InferenceServicer_to_server,
        InferenceServicer(
            host, settings.replica_id, settings.chunk_messages_per_s, settings.max_chunk_interval_ms / 1e3
        ),
        SERVICE_NAME,
    )
    try:
        async with server:
            # Health answers NOT_SERVING while the model loads; Envoy sends nothing until SERVING.
            if await server.until_stop(host.start()):
                await server.set_serving(True)
                watcher = asyncio.create_task(host.watch(lambda: server.set_serving(False)))
                await server.wait_for_stop()
                await cancel(watcher)
    finally:
        await host.close()


def main() -> None:
    settings = InferenceSettings()
    run("inference", settings, lambda: serve(settings))


# vLLM starts its engine core in spawned processes that import this module:
# nothing may run on import.
if __name__ == "__main__":
    main()
