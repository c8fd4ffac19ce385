"""The local stack's child processes: they start whatever the parent is doing, keep to their CPUs, die with it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_devstack.processes import Process
from sluice_devstack.waiting import eventually


@pytest.fixture
async def busy_grpc() -> AsyncIterator[None]:
    """This process's threads in gRPC all the time, as the stack's are while it starts replicas."""
    server = GrpcServer(ServiceSettings(drain_delay_s=0), ["busy"], handle_signals=False)
    async with server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        running = True

        async def call() -> None:
            while running:
                await stub.Check(health_pb2.HealthCheckRequest(service="busy"))

        callers = [asyncio.create_task(call()) for _ in range(4)]
        yield
        running = False
        await asyncio.gather(*callers)


async def test_children_start_while_the_parent_is_in_grpc(busy_grpc: None, tmp_path: Path) -> None:
    # Forking with Python code before exec ran gRPC's fork handlers: 26 of 60 children died of SIGSEGV.
    codes = []
    for i in range(40):
        child = Process(f"child-{i}", [sys.executable, "-c", "pass"], {}, tmp_path / f"{i}.log")
        codes.append(await asyncio.wait_for(child.wait(), 30))
    assert codes == [0] * 40


async def test_a_child_keeps_to_its_cpus(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    script = "import os; print(sorted(os.sched_getaffinity(0)))"
    child = Process("pinned", [sys.executable, "-c", script], {}, tmp_path / "pinned.log", cpus=frozenset({cpu}))
    assert await asyncio.wait_for(child.wait(), 30) == 0
    assert child.log_path.read_text().strip() == str([cpu])


async def test_children_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    # A parent that starts a long-lived child, then is killed without a chance to stop it
    # (both sleep only to live on until then).
    parent = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from sluice_devstack.processes import Process
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = Process("orphan", sleeper, {{}}, Path({str(tmp_path)!r}) / "c.log")
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    starter = await asyncio.create_subprocess_exec(sys.executable, "-c", parent, stdout=asyncio.subprocess.PIPE)
    assert starter.stdout is not None
    child_pid = int(await starter.stdout.readline())
    starter.send_signal(signal.SIGKILL)
    await starter.wait()
    await eventually(lambda: not _alive(child_pid), 10, "the child dies with the process that started it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead: it only waits for init to reap it.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"
