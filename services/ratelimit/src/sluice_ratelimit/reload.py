"""The configuration in force, reloaded when its files change.

A change is applied only if every file still loads: a bad edit keeps the
previous configuration, and the error goes to the log and to the
``sluice_ratelimit_config_loads_total{result="error"}`` counter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import Counter

from sluice_ratelimit.config import Config, ConfigError, config_files, load

logger = logging.getLogger(__name__)

CONFIG_LOADS = Counter("sluice_ratelimit_config_loads", "Configuration loads by result (ok, error).", ["result"])

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    """What changes when a file is edited, added or removed."""
    try:
        files = config_files(paths)
    except ConfigError:
        return ()
    prints = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        prints.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(prints)


class ConfigStore:
    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._seen = fingerprint(self._paths)
        self.current: Config = load(self._paths)  # a bad configuration at start-up stops the service
        CONFIG_LOADS.labels("ok").inc()
        logger.info(
            "loaded rate limits for domains %s from %d files", sorted(self.current.domains), len(self.current.files)
        )

    def reload_if_changed(self) -> bool:
        """Load again if the files changed; True if a new configuration is now in force."""
        seen = fingerprint(self._paths)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            config = load(self._paths)
        except (ConfigError, OSError) as exc:
            CONFIG_LOADS.labels("error").inc()
            logger.error("kept the previous rate-limit configuration: %s", exc)
            return False
        self.current = config
        CONFIG_LOADS.labels("ok").inc()
        logger.info("reloaded rate limits for domains %s", sorted(config.domains))
        return True

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:
                # Whatever a file held, later edits must still be picked up.
                CONFIG_LOADS.labels("error").inc()
                logger.exception("kept the previous rate-limit configuration")
