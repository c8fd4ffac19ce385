"""The local stack's own processes: one that dies is reported, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice_cli.redis_server import RedisServer
from sluice_cli.stack import LocalStack, StackError, StackOptions, StackPorts, free_ports


async def test_a_redis_the_stack_started_is_watched_like_its_services(tmp_path: Path) -> None:
    stack = LocalStack(StackOptions(state_dir=tmp_path, ports=StackPorts.free()))
    redis = RedisServer(free_ports(1)[0], tmp_path / "redis")
    await redis.start()
    stack._redis = redis  # what start() does when no Redis answers on 6379
    try:
        stack.check_alive()
        assert redis.process is not None
        await redis.process.stop(grace_s=0)  # dies under the stack
        with pytest.raises(StackError, match="redis exited"):
            stack.check_alive()
    finally:
        await redis.stop()
