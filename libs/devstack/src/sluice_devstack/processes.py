"""Starting and stopping the local stack's processes without leaving orphans.

Each child runs in its own process group (vLLM's engine-core processes join
its group) and asks the kernel for SIGTERM if its parent dies. It is stopped
with SIGTERM to the child alone, which drains and stops its own children
(vLLM's engine core aborts every request it holds the moment it gets a
SIGTERM, before the server could let them finish), then SIGKILL to whatever
is left of the group after a grace period. A child may be confined to some
CPUs, or run as another user; its own children inherit both.

No Python runs between fork and exec (no ``preexec_fn``): the parent uses
gRPC, whose fork handlers crash a child forked while other threads are in
gRPC (SIGSEGV before exec, 26 of 60 spawns in a check). The user is set by
``Popen`` itself, and the parent-death signal and the CPUs by util-linux's
``setpriv`` and ``taskset`` in front of the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _wrapped(argv: Sequence[str], cpus: frozenset[int] | None) -> list[str]:
    """``argv`` behind the tools that set, as it starts, what its children inherit."""
    prefix: list[str] = []
    if (setpriv := shutil.which("setpriv")) is not None:
        # A parent that died before setpriv asked for the signal never sends it: the shell, run
        # after the request, finds itself adopted by another process then, and exits.
        guard = f'[ "$PPID" = {os.getpid()} ] || exit 1; exec "$@"'
        prefix += [setpriv, "--pdeathsig", "TERM", "/bin/sh", "-c", guard, "sh"]
    if cpus and (taskset := shutil.which("taskset")) is not None:
        prefix += [taskset, "--cpu-list", ",".join(map(str, sorted(cpus)))]
    return [*prefix, *argv]


class Process:
    """One child process, logging to a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cpus: frozenset[int] | None = None,
        uid: int | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                _wrapped(argv, cpus),
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
            )
        if cpus and shutil.which("taskset") is None:
            # Before it starts children of its own, in practice (its imports take a while).
            os.sched_setaffinity(self._popen.pid, cpus)
        logger.debug("started %s (pid %d): %s", name, self._popen.pid, " ".join(argv))

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """Until it exits by itself; its exit code."""
        return await asyncio.to_thread(self._popen.wait)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the child, wait up to ``grace_s``, then SIGKILL whatever is left of its group."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self._popen.wait), grace_s)
            except TimeoutError:
                logger.warning("%s did not stop within %.0fs; killing it", self.name, grace_s)
        # The leader may be gone while children of its group linger.
        self.signal_group(signal.SIGKILL)
        await asyncio.to_thread(self._popen.wait)
