"""``sluice-queue``: serve the public Generation API."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sluice.datastore.v1 import datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2_grpc
from sluice.inference.v1 import inference_pb2_grpc
from sluice.ratelimit.v1 import budgets_pb2_grpc
from sluice_core.channels import channel
from sluice_core.server import GrpcServer
from sluice_core.service import cancel, freeze_heap, run
from sluice_queue import SERVICE_NAME
from sluice_queue.auth import Authenticator
from sluice_queue.budget import Budgets
from sluice_queue.conversations import Conversations
from sluice_queue.engines import Engines
from sluice_queue.ledger import Ledger
from sluice_queue.scheduler import Scheduler, connect
from sluice_queue.servicer import GenerationServicer
from sluice_queue.settings import QueueSettings
from sluice_queue.usage import UsageRecorder

logger = logging.getLogger(__name__)


async def serve(settings: QueueSettings) -> None:
    channels = {
        target: channel(target, settings.tls())
        for target in {settings.inference_target, settings.datastore_target, settings.ratelimit_target}
    }
    inference = inference_pb2_grpc.InferenceStub(channels[settings.inference_target])
    datastore = datastore_pb2_grpc.DataStoreStub(channels[settings.datastore_target])
    ratelimit = budgets_pb2_grpc.BudgetsStub(channels[settings.ratelimit_target])
    redis = connect(settings.redis_url, settings.redis_timeout_ms / 1e3)
    scheduler = Scheduler(redis, settings.scheduler())
    engines = Engines(inference, scheduler.report_engines, settings.engine_interval_s, settings.engine_probes)
    ledger = Ledger(redis, settings.queue_prefix, settings.usage_draft_interval_s, settings.lease_s)
    usage = UsageRecorder(datastore, settings.usage_batch_size, settings.usage_flush_interval_s, ledger=ledger)
    budgets = Budgets(
        ratelimit,
        settings.budget_lease_s,
        settings.budget_idle_s,
        timeout_s=settings.budget_timeout_ms / 1e3,
        fail_closed=settings.budget_fail_closed,
    )
    conversations = Conversations(datastore)
    servicer = GenerationServicer(
        inference,
        scheduler,
        engines,
        Authenticator(
            datastore,
            timeout_s=settings.auth_timeout_ms / 1e3,
            stale_s=settings.auth_stale_s,
            max_lookups=settings.auth_max_lookups,
        ),
        budgets,
        conversations,
        usage,
        settings.usage_commit_timeout_ms / 1e3,
    )
    server = GrpcServer(settings, health_names=[SERVICE_NAME])
    server.add(generation_pb2_grpc.add_GenerationServicer_to_server, servicer, SERVICE_NAME)

    async def write_usage() -> None:
        if not await usage.flush():
            logger.error("%d usage records not written before shutdown; another replica will", usage.pending)
        await usage.mirror()

    async def store_exchanges() -> None:
        if not await conversations.flush():
            logger.error("%d exchanges could not be stored before shutdown", conversations.pending)

    # Closed in the reverse order, each whatever the others do: nothing in flight is dropped
    # (refunds finish, usage and kept exchanges are written) before the connections go.
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(redis.aclose)
        for connected in channels.values():
            stack.push_async_callback(connected.close)
        stack.push_async_callback(store_exchanges)
        stack.push_async_callback(write_usage)
        stack.push_async_callback(budgets.close)
        stack.push_async_callback(scheduler.drain)
        stack.push_async_callback(servicer.drain)
        tasks = [asyncio.create_task(job.run()) for job in (engines, scheduler, usage, budgets, conversations)]
        stack.push_async_callback(cancel, *tasks)
        await stack.enter_async_context(server)
        freeze_heap()
        await server.set_serving(True)
        await server.wait_for_stop()


def main() -> None:
    settings = QueueSettings()
    run("queue", settings, lambda: serve(settings))


if __name__ == "__main__":
    main()
