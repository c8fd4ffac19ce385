"""``sluice.ratelimit.v1.Budgets``: the queue's token and request budgets, all or nothing.

Sluice's own API, next to Envoy's on the same Redis state, so that Envoy's
stays exactly upstream's: a reservation takes every budget's hits or none,
and a refund gives hits back, which Envoy's API has no way to say. When Redis
cannot answer, the call is UNAVAILABLE and the queue decides, by its own
setting, whether requests go ahead unchecked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2

from sluice.ratelimit.v1 import budgets_pb2, budgets_pb2_grpc
from sluice_core.errors import FieldViolation, InvalidArgument, Unavailable
from sluice_ratelimit.limiter import Check, Decision, Limiter, Mode

SERVICE_NAME = "sluice.ratelimit.v1.Budgets"

MAX_BUDGETS = 16
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_MAX_OWNER_CHARS = 128
# Integers a Lua number (a double) holds exactly, multiplied by hits and periods.
_MAX_COUNT = 2**40
_MAX_PERIOD_S = 366 * 86_400


class BudgetsServicer(budgets_pb2_grpc.BudgetsServicer):
    def __init__(self, limiter: Limiter, key_prefix: str) -> None:
        self._limiter = limiter
        self._key_prefix = key_prefix

    async def Reserve(
        self, request: budgets_pb2.ReserveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> budgets_pb2.ReserveResponse:
        _validate(request.budgets, "reserve")
        decisions = await self._decide(request.budgets, Mode.CONSUME)
        response = budgets_pb2.ReserveResponse(reserved=all(d.admitted for d in decisions))
        for budget, decision in zip(request.budgets, decisions, strict=True):
            standing = response.standings.add(fits=decision.within, remaining=decision.remaining)
            if not decision.within and budget.hits <= budget.limit:  # else no wait would help
                standing.retry_after.CopyFrom(_seconds(math.ceil(decision.wait_s)))
        return response

    async def Refund(
        self, request: budgets_pb2.RefundRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> budgets_pb2.RefundResponse:
        _validate(request.budgets, "refund")
        await self._decide(request.budgets, Mode.REFUND)
        return budgets_pb2.RefundResponse()

    async def _decide(self, budgets: Sequence[budgets_pb2.Budget], mode: Mode) -> list[Decision]:
        checks = [
            Check(
                f"{self._key_prefix}budget|{b.name}={b.owner}|{b.limit}/{b.period_s}s",
                b.period_s,
                b.limit,
                b.hits,
                Mode.CHECK if b.hits == 0 else mode,
            )
            for b in budgets
        ]
        try:
            return await self._limiter.decide(checks)
        except Exception as exc:  # Redis away or too slow: nothing is known to have been taken
            raise Unavailable("the budget store is unavailable", retry_after_s=1.0) from exc


def _validate(budgets: Sequence[budgets_pb2.Budget], verb: str) -> None:
    violations: list[FieldViolation] = []
    if not 1 <= len(budgets) <= MAX_BUDGETS:
        violations.append(FieldViolation("budgets", f"{verb} from 1 to {MAX_BUDGETS} budgets at once"))
    for i, budget in enumerate(budgets[:MAX_BUDGETS]):
        field = f"budgets[{i}]"
        if not _NAME.fullmatch(budget.name):
            violations.append(FieldViolation(f"{field}.name", "1 to 64 letters, digits or underscores"))
        if not 1 <= len(budget.owner) <= _MAX_OWNER_CHARS:
            violations.append(FieldViolation(f"{field}.owner", f"1 to {_MAX_OWNER_CHARS} characters"))
        if not 1 <= budget.limit <= _MAX_COUNT:
            violations.append(FieldViolation(f"{field}.limit", f"from 1 to {_MAX_COUNT}"))
        if not 1 <= budget.period_s <= _MAX_PERIOD_S:
            violations.append(FieldViolation(f"{field}.period_s", f"from 1 to {_MAX_PERIOD_S} (a year)"))
        if budget.hits > _MAX_COUNT or (verb == "refund" and budget.hits == 0):
            least = 1 if verb == "refund" else 0
            violations.append(FieldViolation(f"{field}.hits", f"from {least} to {_MAX_COUNT}"))
    if violations:
        raise InvalidArgument(violations)


def _seconds(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)
