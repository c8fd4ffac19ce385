"""``sluice-ratelimit``: serve Envoy's Rate Limit Service API, and sluice's budgets on the same state."""

from __future__ import annotations

import asyncio
import contextlib

from envoy_api.envoy.service.ratelimit.v3 import rls_pb2_grpc
from sluice.ratelimit.v1 import budgets_pb2_grpc
from sluice_core.redis_pool import pooled_redis
from sluice_core.server import GrpcServer
from sluice_core.service import cancel, freeze_heap, run
from sluice_ratelimit import SERVICE_NAME, budgets
from sluice_ratelimit.decisions import Decider, Policy
from sluice_ratelimit.limiter import Limiter
from sluice_ratelimit.overlimit_cache import OverLimitCache
from sluice_ratelimit.reload import ConfigStore
from sluice_ratelimit.servicer import RateLimitServicer
from sluice_ratelimit.settings import RateLimitSettings


async def serve(settings: RateLimitSettings) -> None:
    store = ConfigStore(settings.config_paths)
    # The Limiter bounds Redis's answer to each pipeline, the client's own timeouts each read and connect.
    timeout_s = settings.redis_timeout_ms / 1e3
    policy = Policy(
        key_prefix=settings.key_prefix, fail_closed=settings.fail_closed, near_limit_ratio=settings.near_limit_ratio
    )
    async with contextlib.AsyncExitStack() as stack:
        redis = pooled_redis(
            settings.redis_url, 256, timeout_s, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        stack.push_async_callback(redis.aclose)
        limiter = Limiter(redis, timeout_s)
        decider = Decider(lambda: store.current, limiter, policy, OverLimitCache() if settings.local_cache else None)
        server = GrpcServer(settings, health_names=[SERVICE_NAME])
        server.add(rls_pb2_grpc.add_RateLimitServiceServicer_to_server, RateLimitServicer(decider), SERVICE_NAME)
        server.add(
            budgets_pb2_grpc.add_BudgetsServicer_to_server,
            budgets.BudgetsServicer(limiter, settings.key_prefix),
            budgets.SERVICE_NAME,
        )
        watcher = asyncio.create_task(store.watch(settings.reload_interval_s))
        stack.push_async_callback(cancel, watcher)
        await stack.enter_async_context(server)
        freeze_heap()
        await server.set_serving(True)
        await server.wait_for_stop()


def main() -> None:
    settings = RateLimitSettings()
    run("ratelimit", settings, lambda: serve(settings))


if __name__ == "__main__":
    main()
