"""A first-come-first-served bound on streams in flight, with a bounded waiting line.

Waiters learn their position whenever it changes. A waiter that goes away
(cancelled, or its deadline passed) leaves the line at once. This is the
simple bound of the first version; priorities and fairness come later.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from sluice_core.errors import ResourceExhausted


class Ticket:
    """One caller's place: waiting in line, then holding a slot until released."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._changed = asyncio.Event()
        self.admitted = False
        self.released = False

    @property
    def position(self) -> int:
        """1 is next in line; 0 once admitted."""
        return 0 if self.admitted else self._admission.position_of(self)

    def notify(self) -> None:
        self._changed.set()

    async def positions(self) -> AsyncIterator[int]:
        """Yield each new position while waiting; return once admitted."""
        last = 0
        while not self.admitted:
            position = self.position
            if position != last:
                last = position
                yield position
            self._changed.clear()
            await self._changed.wait()

    def release(self) -> None:
        """Give back the slot, or leave the line. Safe to call twice."""
        if not self.released:
            self.released = True
            self._admission.leave(self)


class Admission:
    def __init__(self, max_in_flight: int, max_waiting: int, retry_after_s: float) -> None:
        self._max_in_flight = max_in_flight
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._waiting: deque[Ticket] = deque()
        self.in_flight = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self) -> Ticket:
        """Take a slot if one is free, else a place in line; RESOURCE_EXHAUSTED when the line is full."""
        ticket = Ticket(self)
        if self.in_flight < self._max_in_flight and not self._waiting:
            ticket.admitted = True
            self.in_flight += 1
            return ticket
        if len(self._waiting) >= self._max_waiting:
            raise ResourceExhausted(
                f"sluice is at capacity ({self.in_flight} generating, {len(self._waiting)} waiting); retry later",
                retry_after_s=self._retry_after_s,
            )
        self._waiting.append(ticket)
        return ticket

    def position_of(self, ticket: Ticket) -> int:
        return self._waiting.index(ticket) + 1

    def leave(self, ticket: Ticket) -> None:
        if ticket.admitted:
            self.in_flight -= 1
        else:
            self._waiting.remove(ticket)
        admitted = []
        while self._waiting and self.in_flight < self._max_in_flight:
            first = self._waiting.popleft()
            first.admitted = True
            self.in_flight += 1
            admitted.append(first)
        # Everyone behind moved up a place.
        for waiter in (*admitted, *self._waiting):
            waiter.notify()
