"""The local stack's own processes: one that dies is reported, not ignored, and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from sluice_core.settings import ServiceSettings
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LocalStack, StackError, StackOptions, StackPorts, free_ports
from sluice_devstack.waiting import eventually


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


async def test_a_process_started_again_takes_what_its_killed_predecessor_left(tmp_path: Path) -> None:
    stack = LocalStack(StackOptions(state_dir=tmp_path, ports=StackPorts.free()))
    # A replica whose engine runs in a child process of its group, as vLLM's does (each sleeps to live on).
    sleep = "import time; time.sleep(60)"
    script = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    first = stack._spawn("replica", [sys.executable, "-c", script], {})
    await eventually(lambda: bool(psutil.Process(first.pid).children()), 10, "the replica's engine process started")
    (engine,) = psutil.Process(first.pid).children()
    with pytest.raises(StackError, match="already running"):
        stack._spawn("replica", [sys.executable, "-c", script], {})
    os.kill(first.pid, signal.SIGKILL)  # the replica alone: its engine lives on
    await first.wait()
    assert engine.is_running()
    second = stack._spawn("replica", [sys.executable, "-c", "pass"], {})
    await second.wait()
    engine.wait(timeout=5)  # raises if the leftover still runs


def test_a_stopping_service_gets_its_whole_drain_and_grace_before_it_is_killed(tmp_path: Path) -> None:
    # It was killed after 20 s, though a service lets its calls finish for 30 s after a 1 s drain.
    service = ServiceSettings()
    options = StackOptions(state_dir=tmp_path, ports=StackPorts.free())
    assert options.stop_grace_s > service.drain_delay_s + service.shutdown_grace_s
