"""GCRA limits decided atomically in Redis, every key of a request in one script call.

GCRA (the generic cell rate algorithm) keeps one number per key: how far the
key's "theoretical arrival time" is ahead of now, its *debt*. Each hit adds
``period / limit`` to it; a request is admitted if the debt stays within one
period. That lets a burst of up to ``limit`` through at once and then refills
smoothly, one hit every ``period / limit``: at most ``2 * limit - 1`` in any
window of one period, never two bursts back to back (docs/ratelimit.md).
Refunds subtract.

One Lua script takes every check of a request (``KEYS``) and decides them all
or none: when any check fails, nothing is consumed anywhere. A *charge* is
the exception: it is recorded whatever is decided, going past the limit into
debt (at most one period past full), because it is for work already done
(Envoy charging a stream when it is over). The debt is kept relative to when
it was written so the numbers stay small and exact.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

# Calls per pipeline: a burst larger than this goes in several, one after another.
_MOST_PER_PIPELINE = 500

# ARGV[1]: now in microseconds, or -1 to take Redis' clock (shared by every
# replica of this service). Then per key, five values: period (us), limit,
# hits, mode (0 consume, 1 check only, 2 refund, 3 charge), shadow (1: never blocks).
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
  local step = period / math.max(limit, 1)
  -- Room for floating-point rounding: nanoseconds, far below one hit.
  local slack = period * 1e-12 + 1e-3
  local stored = redis.call('HMGET', KEYS[i], 'd', 't')
  local debt = 0
  if stored[1] then
    debt = math.max(0, tonumber(stored[1]) - (now - tonumber(stored[2])))
  end
  local after = debt
  if mode == 0 or mode == 3 then after = debt + hits * step
  elseif mode == 2 then after = math.max(0, debt - hits * step) end
  local within = after <= period + slack or mode == 2
  -- A limit of 0 (a block list) refuses every hit and every check, and charges nothing.
  if limit == 0 then within, after = mode == 2, debt end
  -- A charge owes at most one period past full: refused for at most a period after it, as a
  -- fixed window (the reference service's) forgets at its end.
  if mode == 3 then after = math.min(after, 2 * period) end
  local ok = within or shadow == 1
  if not ok then over = true end
  debts[i], admitted[i] = {debt, after, period, step, hits, within, mode, limit}, ok
end
local out = {}
for i = 1, n do
  local debt, after, period, step, hits, within, mode, limit = unpack(debts[i])
  -- A shadow-mode check over its limit is admitted but not recorded, as enforcement would not
  -- have: switching it to enforcing then decides exactly as if it had been enforcing all along.
  local recorded = (not over and within) or mode == 3
  if recorded and after ~= debt then
    redis.call('HSET', KEYS[i], 'd', after, 't', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil(after / 1000) + 1)
  end
  local now_debt = after
  if not recorded then now_debt = debt end
  local remaining = 0
  if limit > 0 then remaining = math.max(0, math.floor((period - now_debt) / step + 1e-6)) end
  local wait, wait_one = 0, 0
  if not within then
    -- A charge is already recorded: the wait is for the same hits again.
    local owed = debt
    if mode == 3 then owed = now_debt end
    wait = math.ceil(owed + hits * step - period)
    wait_one = math.max(0, math.ceil(owed + step - period))
  end
  out[i] = {admitted[i] and 1 or 0, remaining, math.ceil(now_debt), wait, wait_one, within and 1 or 0}
end
return out
"""


class Mode(enum.IntEnum):
    CONSUME = 0  # taken if every check of the request fits, else nothing is
    CHECK = 1  # whether the key is within its limit; nothing taken
    REFUND = 2  # given back
    CHARGE = 3  # taken whatever is decided, into debt if need be


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
    """Runs the script, one call per request; the calls made while Redis answers the last ones go
    together, in one pipeline (one round trip, one connection).

    ``timeout_s`` bounds Redis's answer to a pipeline, plus ``per_call_s`` for
    each call in it, from when it is sent: a thousand requests at once are not
    a Redis outage because the last of them waited for the first (a bound on
    each whole call, waiting included, failed part of such bursts open on a
    healthy Redis; docs/ratelimit.md). ``now_us`` is for tests with a controlled clock
    (Redis' clock otherwise).
    """

    def __init__(self, redis: Redis, timeout_s: float = 0.04, per_call_s: float = 0.0002) -> None:
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._timeout_s = timeout_s
        self._per_call_s = per_call_s
        self._due: list[tuple[list[str], list[int], asyncio.Future[list[list[int]]]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def decide(self, checks: Sequence[Check], now_us: int | None = None) -> list[Decision]:
        if not checks:
            return []
        args: list[int] = [-1 if now_us is None else now_us]
        for check in checks:
            args += [check.period_s * 1_000_000, check.limit, check.hits, int(check.mode), int(check.shadow)]
        answer: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self._due.append(([c.key for c in checks], args, answer))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send())
        # A caller that leaves does not take its call out of a pipeline already under way.
        rows = await asyncio.shield(answer)
        return [Decision(bool(a), int(r), d / 1e6, w / 1e6, w1 / 1e6, bool(x)) for a, r, d, w, w1, x in rows]

    async def _send(self) -> None:
        while self._due:
            calls, self._due = self._due[:_MOST_PER_PIPELINE], self._due[_MOST_PER_PIPELINE:]
            try:
                answers = await self._pipeline(calls)
                lost = [call for call, rows in zip(calls, answers, strict=True) if isinstance(rows, NoScriptError)]
                if lost:  # Redis restarted or was flushed: those calls did not run, and run again
                    await self._redis.script_load(_SCRIPT)
                    again = iter(await self._pipeline(lost))
                    answers = [next(again) if isinstance(rows, NoScriptError) else rows for rows in answers]
            except Exception as exc:  # Redis away or too slow: every call in the pipeline hears it
                for *_, answer in calls:
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            for (*_, answer), rows in zip(calls, answers, strict=True):
                if not answer.done():
                    answer.set_exception(rows) if isinstance(rows, Exception) else answer.set_result(rows)

    async def _pipeline(self, calls: Sequence[tuple[list[str], list[int], object]]) -> list[Any]:
        """One EVALSHA per call, in one round trip; each answer, or the error it got."""
        async with self._redis.pipeline(transaction=False) as pipeline:
            for keys, args, _ in calls:
                _ = pipeline.evalsha(self._script.sha, len(keys), *keys, *args)  # queued, sent by execute
            async with asyncio.timeout(self._timeout_s + len(calls) * self._per_call_s):
                answers: list[Any] = await pipeline.execute(raise_on_error=False)
        return answers
