"""The whole stack (Envoy, inference replicas, queue) as real processes on free ports."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sluice_cli.stack import LOOPBACK, LocalStack, StackOptions, StackPorts


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """Starts with one inference replica; the first test starts the second (see test_stack.py)."""
    state_dir: Path = tmp_path_factory.mktemp("stack")
    local = LocalStack(StackOptions(state_dir=state_dir, ports=StackPorts.free(replicas=2)))
    try:
        await local.start(replicas=1)
        yield local
    finally:
        await local.stop()


def requests_served(stack: LocalStack, index: int) -> float:
    """Requests a replica finished, from its Prometheus endpoint."""
    url = f"http://{LOOPBACK}:{stack.ports.inference_metrics[index]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^sluice_inference_requests_total\{[^}]*\} (\S+)$", text, re.M))


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> float:
    """Seconds until ``check`` holds; fails after ``within_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > within_s:
            raise AssertionError(f"not within {within_s}s: {what}")
        await asyncio.sleep(0.02)
    return loop.time() - start
