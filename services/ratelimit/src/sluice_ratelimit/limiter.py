"""GCRA limits decided atomically in Redis, every key of a request in one script call.

GCRA (the generic cell rate algorithm) keeps one number per key: how far the
key's "theoretical arrival time" is ahead of now, its *debt*. Each hit adds
``period / limit`` to it; a request is admitted if the debt stays within one
period. That admits exactly ``limit`` hits in any window of one period, lets a
burst of up to ``limit`` through at once, and then refills smoothly, so there
is no double burst at a window edge as with fixed windows. Refunds subtract.

One Lua script takes every check of a request (``KEYS``) and decides them all
or none: when any check fails, nothing is consumed anywhere. The debt is kept
relative to when it was written so the numbers stay small and exact.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

# ARGV[1]: now in microseconds, or -1 to take Redis' clock (shared by every
# replica of this service). Then per key, five values: period (us), limit,
# hits, mode (0 consume, 1 check only, 2 refund), shadow (1: never blocks).
# Returns per key: {admitted 0/1, remaining, debt after (us), wait until
# these hits fit (us), wait until one hit fits (us), within the limit 0/1}
# (a shadow-mode check is admitted even when it is not within its limit).
_SCRIPT = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = #KEYS
local debts, admitted, over = {}, {}, false
for i = 1, n do
  local a = 1 + (i - 1) * 5
  local period, limit = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local hits, mode, shadow = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local step = period / limit
  -- Room for floating-point rounding: nanoseconds, far below one hit.
  local slack = period * 1e-12 + 1e-3
  local stored = redis.call('HMGET', KEYS[i], 'd', 't')
  local debt = 0
  if stored[1] then
    debt = math.max(0, tonumber(stored[1]) - (now - tonumber(stored[2])))
  end
  local after = debt
  if mode == 0 then after = debt + hits * step
  elseif mode == 2 then after = math.max(0, debt - hits * step) end
  local within = after <= period + slack or mode == 2
  local ok = within or shadow == 1
  if not ok then over = true end
  debts[i], admitted[i] = {debt, after, period, step, hits, within}, ok
end
local out = {}
for i = 1, n do
  local debt, after, period, step, hits, within = unpack(debts[i])
  if not over and after ~= debt then
    redis.call('HSET', KEYS[i], 'd', after, 't', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil(after / 1000) + 1)
  end
  local now_debt = after
  if over then now_debt = debt end
  local remaining = math.max(0, math.floor((period - now_debt) / step + 1e-6))
  local wait, wait_one = 0, 0
  if not within then
    wait = math.ceil(debt + hits * step - period)
    wait_one = math.max(0, math.ceil(debt + step - period))
  end
  out[i] = {admitted[i] and 1 or 0, remaining, math.ceil(now_debt), wait, wait_one, within and 1 or 0}
end
return out
"""


class Mode(enum.IntEnum):
    CONSUME = 0
    CHECK = 1
    REFUND = 2


@dataclass(frozen=True)
class Check:
    key: str
    period_s: int
    limit: int
    hits: int
    mode: Mode = Mode.CONSUME
    shadow: bool = False


@dataclass(frozen=True)
class Decision:
    admitted: bool  # this check alone would pass (shadow checks always do)
    remaining: int  # hits still admissible now, after this request if it was applied
    reset_s: float  # until the key is back to its full limit
    wait_s: float  # until this check's hits would fit (0 if they do now)
    wait_one_s: float  # until a single hit would fit (0 if one does now)
    within: bool  # the hits fit the limit (differs from admitted only in shadow mode)


class Limiter:
    """Runs the script; ``now_us`` is for tests with a controlled clock (Redis' clock otherwise)."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_SCRIPT)

    async def decide(self, checks: Sequence[Check], now_us: int | None = None) -> list[Decision]:
        if not checks:
            return []
        args: list[int] = [-1 if now_us is None else now_us]
        for check in checks:
            args += [check.period_s * 1_000_000, check.limit, check.hits, int(check.mode), int(check.shadow)]
        # One EVALSHA; redis-py loads the script and retries once if Redis lost it (NOSCRIPT).
        rows = await self._script(keys=[c.key for c in checks], args=args)
        return [Decision(bool(a), int(r), d / 1e6, w / 1e6, w1 / 1e6, bool(x)) for a, r, d, w, w1, x in rows]
