"""Keys known to be over their limit, answered without asking Redis until they could admit a hit again."""

from __future__ import annotations

import time
from collections.abc import Callable

_PRUNE_AT = 10_000


class OverLimitCache:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}

    def remember(self, key: str, seconds: float) -> None:
        """``key`` cannot admit even one hit for ``seconds``."""
        if seconds <= 0:
            return
        now = self._clock()
        if len(self._until) >= _PRUNE_AT:
            self._until = {k: t for k, t in self._until.items() if t > now}
        self._until[key] = now + seconds

    def over_for(self, key: str) -> float:
        """Seconds ``key`` is still known to be over its limit (0 if not known to be)."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left
