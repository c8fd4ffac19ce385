"""A private PostgreSQL for the local stack and the tests, where none is given.

The binaries come from the `pgserver` wheel (PostgreSQL 16, pinned in
requirements.lock), so a fresh machine needs nothing installed by hand.
PostgreSQL refuses to run as root; under root (CI containers) it runs as the
unprivileged user ``nobody``, with its data in a folder of its own under the
system's temporary folder (so it starts empty each time).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from sluice_devstack.processes import Process

NOBODY = 65534


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no PostgreSQL binaries: install the pgserver wheel (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def ensure_database(server_url: str, name: str) -> str:
    """The URL of database ``name`` on a server, created if missing (``server_url`` without a database)."""
    connection = await asyncpg.connect(f"{server_url}/postgres", timeout=5)
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return f"{server_url}/{name}"


class PostgresServer:
    """``postgres`` on 127.0.0.1:``port`` with trust authentication and a database ``sluice``."""

    def __init__(self, port: int, state_dir: Path, durable: bool = True, log_statements: bool = False) -> None:
        self.port = port
        self._state_dir = state_dir
        self._uid = NOBODY if os.geteuid() == 0 else None
        # nobody cannot reach into root's private folders (pytest's, for one).
        self._home = state_dir if self._uid is None else Path(tempfile.mkdtemp(prefix="sluice-postgres-"))
        self._durable = durable
        self._log_statements = log_statements
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/sluice"

    @property
    def log_path(self) -> Path:
        return self._state_dir / "postgres.log"

    def _initdb(self, data: Path) -> None:
        subprocess.run(
            [str(postgres_bin_dir() / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
            user=self._uid,
            group=self._uid,
        )

    async def start(self, timeout_s: float = 30.0) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        if self._uid is not None:
            self._home.chmod(0o711)
            os.chown(self._home, self._uid, self._uid)
        data = self._home / "data"
        if not (data / "PG_VERSION").is_file():
            await asyncio.to_thread(self._initdb, data)
        uid = self._uid
        sockets = self._home / "sockets"
        sockets.mkdir(parents=True, exist_ok=True)
        if uid is not None:
            os.chown(sockets, uid, uid)
        argv = [
            str(postgres_bin_dir() / "postgres"),
            "-D", str(data),
            "-p", str(self.port),
            "-k", str(sockets),
            "-c", "listen_addresses=127.0.0.1",
        ]  # fmt: skip
        if not self._durable:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        if self._log_statements:
            argv += ["-c", "log_statement=all"]
        self.process = Process("postgres", argv, {}, self.log_path, uid=uid)
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self._ready):
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {self.process.log_tail()}")
            await asyncio.sleep(0.1)
        await ensure_database(f"postgresql://postgres@127.0.0.1:{self.port}", "sluice")

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(postgres_bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
        )
        return result.returncode == 0

    async def stop(self) -> None:
        """Stop the server; its data stays for a later ``start``."""
        if self.process is not None:
            await self.process.stop(10.0)
            self.process = None

    def remove_data(self) -> None:
        """Delete the data folder this object created (under root, in the temporary folder)."""
        if self._home != self._state_dir:
            shutil.rmtree(self._home, ignore_errors=True)
