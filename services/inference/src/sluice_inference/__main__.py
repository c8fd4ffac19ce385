"""``sluice-inference``: serve one model replica."""

from __future__ import annotations

import asyncio
import contextlib

from sluice.inference.v1 import inference_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_core.service import cancel, freeze_heap, run
from sluice_inference import SERVICE_NAME
from sluice_inference.host import ModelHost
from sluice_inference.servicer import InferenceServicer
from sluice_inference.settings import InferenceSettings


async def serve(settings: InferenceSettings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        host = ModelHost(settings)
        stack.push_async_callback(host.close)
        server = GrpcServer(settings, health_names=[SERVICE_NAME])
        server.add(
            inference_pb2_grpc.add_InferenceServicer_to_server,
            InferenceServicer(
                host, settings.replica_id, settings.chunk_messages_per_s, settings.max_chunk_interval_ms / 1e3
            ),
            SERVICE_NAME,
        )
        await stack.enter_async_context(server)
        # Health answers NOT_SERVING while the model loads; Envoy sends nothing until SERVING.
        if not await server.until_stop(host.start()):
            return
        freeze_heap()
        await server.set_serving(True)
        watcher = asyncio.create_task(host.watch(lambda: server.set_serving(False)))
        stack.push_async_callback(cancel, watcher)
        await server.wait_for_stop()


def main() -> None:
    settings = InferenceSettings()
    run("inference", settings, lambda: serve(settings))


# vLLM starts its engine core in spawned processes that import this module:
# nothing may run on import.
if __name__ == "__main__":
    main()
