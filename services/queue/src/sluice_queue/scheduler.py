"""One waiting line and one pool of model slots, shared by every queue replica through Redis.

Order: priority class first (interactive before batch), then weighted fair
across tenants (stride scheduling on their scheduling weights), then first
come first served within a tenant. Batch requests leave a share of the slots
free for interactive ones: engines do not preempt, so without it an
interactive request under a batch flood waits for a batch request to end.
Every change is one call of ``schedule.lua``, so replicas never disagree and
never hand out more slots than the inference replicas have.

Slots and places in line are leases that this replica renews; when a replica
dies its leases run out and the slots come back to everyone else. Admissions
are published on a Redis channel, so a waiter learns at once that its slot is
free whichever replica freed it. Positions are refreshed a few times a second
while anyone here waits; a waiter is told its new place at most once per
``position_interval_s`` for each wave of admissions (capacity) ahead of it,
so that near the front every move shows and a long line does not spend the
CPU the engines need on telling hundreds of waiters of every step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from prometheus_client import Gauge
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, RedisError

from sluice.generation.v1 import generation_pb2
from sluice_core.background import Background
from sluice_core.errors import ResourceExhausted, Unavailable
from sluice_core.redis_pool import pooled_redis
from sluice_core.service import cancel, raise_if_cancelled, woken

logger = logging.getLogger(__name__)

_SCRIPT = resources.files(__package__).joinpath("schedule.lua").read_text()

CAPACITY = Gauge("sluice_queue_capacity_slots", "Slots of the inference replicas seen recently (all queue replicas').")
WAITING = Gauge("sluice_queue_waiting_requests", "Requests of this replica waiting for a slot.")
HOLDING = Gauge("sluice_queue_slots_held", "Slots held by this replica's requests.")

INTERACTIVE, BATCH = "1", "2"


def priority_class(priority: generation_pb2.Priority.ValueType) -> str:
    return BATCH if priority == generation_pb2.PRIORITY_BATCH else INTERACTIVE


@dataclass(frozen=True)
class SchedulerConfig:
    prefix: str = "{sluice-queue}"
    lease_s: float = 3.0
    max_waiting_per_class: int = 1024
    max_waiting_per_tenant: int = 256
    retry_after_s: float = 1.0
    position_interval_s: float = 0.25
    # Inference replicas unseen for this long no longer count towards capacity.
    engine_ttl_s: float = 10.0
    # The share of the slots (rounded down) batch requests never take.
    interactive_reserve: float = 0.25

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1e3)


def connect(url: str, timeout_s: float, connections: int = 64) -> Redis:
    """The queue replica's Redis client (``sluice_core.redis_pool``).

    A call that Redis does not answer within ``timeout_s`` fails, so that a
    stalled Redis turns requests away at once (redis-py's own default waits 5 s).
    A connection that turns out broken (Redis restarted) is replaced and the
    call sent again, once: every script call is safe to repeat. The admission
    channel's reads wait with timeouts of their own.
    """
    return pooled_redis(
        url,
        connections,
        2.0,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=10,
        # Not on a timeout (redis-py's default): a stalled Redis would double every wait.
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1, supported_errors=(ConnectionError,)),
        retry_on_error=[ConnectionError],
    )


class Ticket:
    """One request's place in line, then its slot, until released."""

    def __init__(self, scheduler: Scheduler, request_id: str, admitted: bool) -> None:
        self.request_id = request_id
        self._scheduler = scheduler
        self._admitted = admitted
        self._error: Exception | None = None
        # Set once the enter script ran: before that Redis does not know the request yet.
        self.placed = False
        self._position = 0
        self._told_at = 0.0  # loop time the caller was last given a position
        self._changed = asyncio.Event()
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._admitted

    def due(self, position: int, now: float, interval_s: float, capacity: int) -> bool:
        """Whether to tell this waiter ``position``: at once the first time, then once per interval per wave ahead."""
        if position == self._position:
            return False
        waves = -(-position // max(1, capacity))
        return not self._position or now - self._told_at >= interval_s * waves

    def update(self, position: int | None = None, admitted: bool = False, error: Exception | None = None) -> None:
        if position is not None:
            self._position = position
            self._told_at = asyncio.get_running_loop().time()
        self._admitted = self._admitted or admitted
        self._error = self._error or error
        self._changed.set()

    async def positions(self) -> AsyncIterator[int]:
        """Each new position (1 is next) while waiting; returns once the slot is this request's."""
        told = 0
        while True:
            # Cleared before looking: a change made while the caller handles a
            # position (the generator is suspended) is seen on the next turn.
            self._changed.clear()
            if self._admitted:
                return
            if self._error is not None:
                raise self._error
            if self._position and self._position != told:
                told = self._position
                yield told
                continue
            await self._changed.wait()

    async def release(self) -> None:
        """Give the slot back, or leave the line. Safe to call twice."""
        if not self._released:
            self._released = True
            await self._scheduler.leave(self)


class Scheduler:
    def __init__(self, redis: Redis, config: SchedulerConfig) -> None:
        self._redis = redis
        self._config = config
        self._script = redis.register_script(_SCRIPT)
        self._waiting: dict[str, Ticket] = {}
        self._holding: dict[str, Ticket] = {}
        self._refresh = asyncio.Event()
        self._background = Background("releasing a slot")
        self._closing = False
        self._capacity = 1
        WAITING.set_function(lambda: len(self._waiting))
        HOLDING.set_function(lambda: len(self._holding))

    async def _call(self, *args: str | float) -> object:
        return await self._script(keys=[self._config.prefix], args=list(args))

    async def enter(
        self, request_id: str, tenant_id: str, weight: int, priority: generation_pb2.Priority.ValueType
    ) -> Ticket:
        """A slot now, or a place in line; RESOURCE_EXHAUSTED when the line is full for this class or tenant."""
        config = self._config
        ticket = Ticket(self, request_id, admitted=False)
        # Registered before the call: an admission published meanwhile must find it.
        self._waiting[request_id] = ticket
        try:
            answer = await self._call(
                "enter",
                request_id,
                priority_class(priority),
                tenant_id,
                max(1, weight),
                config.max_waiting_per_class,
                config.max_waiting_per_tenant,
                config.lease_ms,
                config.lease_ms,
            )
        except RedisError as exc:
            self._forget(request_id)
            # The script may have run before the reply was lost: give back whatever it took.
            self._spawn_leave(request_id)
            raise Unavailable("the request queue is unreachable; retry shortly", config.retry_after_s) from exc
        except asyncio.CancelledError:
            # The caller left while the script ran: whatever it got is given back.
            self._forget(request_id)
            self._spawn_leave(request_id)
            raise
        assert isinstance(answer, list)
        ticket.placed = True
        state = _text(answer[0])
        if state == "full":
            self._forget(request_id)
            which = "your tenant's" if _text(answer[1]) == "tenant" else "this priority class's"
            raise ResourceExhausted(f"{which} waiting line is full; retry later", retry_after_s=config.retry_after_s)
        if state == "admitted":
            self._admit(request_id)
        else:
            self._refresh.set()
        return ticket

    def _admit(self, request_id: str) -> None:
        ticket = self._waiting.pop(request_id, None)
        if ticket is not None:
            self._holding[request_id] = ticket
            ticket.update(admitted=True)

    def _forget(self, request_id: str) -> None:
        """Stop renewing it here (it may have been admitted meanwhile)."""
        self._waiting.pop(request_id, None)
        self._holding.pop(request_id, None)

    async def leave(self, ticket: Ticket) -> None:
        self._forget(ticket.request_id)
        await self._leave(ticket.request_id)

    async def _leave(self, request_id: str) -> None:
        try:
            await self._call("leave", request_id, self._config.lease_ms)
        except RedisError:
            # The lease runs out by itself within lease_s.
            logger.warning("could not release %s; its lease will expire", request_id)

    def _spawn_leave(self, request_id: str) -> None:
        self._background.spawn(self._leave(request_id))

    async def drain(self) -> None:
        """Wait for the leaves of callers that left mid-enter (at shutdown): their slots come back now."""
        await self._background.drain(timeout_s=5)

    async def report_engines(self, slots: dict[str, int]) -> int:
        """Record the inference replicas just seen with their slots; returns the total capacity."""
        pairs = [value for replica, n in slots.items() for value in (replica, n)]
        config = self._config
        capacity = await self._call("engines", int(config.engine_ttl_s * 1e3), config.interactive_reserve, *pairs)
        assert isinstance(capacity, int)  # a Lua number comes back as an integer
        CAPACITY.set(capacity)
        self._capacity = capacity
        return capacity

    async def run(self) -> None:
        """Listen for admissions, renew leases and refresh positions, until cancelled."""
        tasks = [asyncio.create_task(job()) for job in (self._listen, self._renew, self._positions)]
        try:
            # Not gather: cancelling a gather waits for every loop to take it, and a loop
            # can lose a cancellation (see below). This returns at once when cancelled.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a loop that failed
        finally:
            # The loops also stop on this flag: a cancellation can be lost in a Redis
            # read (redis-py's pub/sub, seen here) or a timeout that fires at the same
            # moment (Python 3.11).
            self._closing = True
            self._refresh.set()
            await cancel(*tasks)

    async def _listen(self) -> None:
        while not self._closing:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(f"{self._config.prefix}:admitted")
                    # Admissions made while (re)subscribing are found by the next refresh.
                    self._refresh.set()
                    while not self._closing:
                        # A timeout, so that the flag is seen even if a cancellation was lost.
                        raise_if_cancelled()
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is None or message["type"] != "message":
                            continue
                        # Those admitted learn at once; the others' new places wait
                        # for the next refresh, so that a busy line costs one
                        # position event per waiter per interval, not one per admission.
                        for request_id in _text(message["data"]).split():
                            self._admit(request_id)
            except RedisError as exc:
                raise_if_cancelled()
                logger.warning("admission channel lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)

    async def _renew(self) -> None:
        config = self._config
        while not self._closing:
            raise_if_cancelled()
            await asyncio.sleep(config.lease_s / 3)
            # A request whose enter script has not run yet is in neither set in Redis:
            # renewing it would wrongly find it lost.
            holding = list(self._holding)
            waiting = [request_id for request_id, ticket in self._waiting.items() if ticket.placed]
            if not holding and not waiting:
                continue
            try:
                lost = await self._call("renew", config.lease_ms, config.lease_ms, len(holding), *holding, *waiting)
            except RedisError as exc:
                raise_if_cancelled()
                logger.warning("could not renew leases: %s", exc)
                continue
            assert isinstance(lost, list)
            for request_id in map(_text, lost):
                if (ticket := self._waiting.pop(request_id, None)) is not None:
                    ticket.update(error=Unavailable("lost its place in line; retry", config.retry_after_s))
                elif request_id in self._holding:
                    logger.warning("the slot lease of %s had run out while it ran; counted again", request_id)

    async def _positions(self) -> None:
        """Dispatch into free slots (capacity may have grown) and tell waiters where they stand."""
        config = self._config
        while not self._closing:
            raise_if_cancelled()
            await woken(self._refresh, config.position_interval_s)
            self._refresh.clear()
            if not self._waiting:
                continue
            try:
                order = await self._call("tick", config.lease_ms, config.max_waiting_per_class * 2)
                assert isinstance(order, list)
                places = {_text(request_id): i + 1 for i, request_id in enumerate(order)}
                missing = [request_id for request_id in self._waiting if request_id not in places]
                leased = await self._redis.zmscore(f"{config.prefix}:leases", missing) if missing else []
            except RedisError as exc:
                raise_if_cancelled()
                logger.warning("could not read the waiting line: %s", exc)
                continue
            for request_id, lease in zip(missing, leased, strict=True):
                if lease is not None:
                    self._admit(request_id)
            now = asyncio.get_running_loop().time()
            for request_id, ticket in list(self._waiting.items()):
                place = places.get(request_id)
                if place is not None and ticket.due(place, now, config.position_interval_s, self._capacity):
                    ticket.update(position=place)
            # New waiters ask for a refresh; under a flood of them, at most five per interval.
            await asyncio.sleep(config.position_interval_s / 5)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
