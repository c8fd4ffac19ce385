"""The first-come-first-served bound: slots, the waiting line, positions, shedding."""

from __future__ import annotations

import asyncio

import pytest

from sluice_core.errors import ResourceExhausted
from sluice_queue.admission import Admission, Ticket


async def next_positions(ticket: Ticket, n: int) -> list[int]:
    positions: list[int] = []
    async for position in ticket.positions():
        positions.append(position)
        if len(positions) == n:
            break
    return positions


def test_admits_up_to_the_bound_then_queues_in_order() -> None:
    admission = Admission(max_in_flight=2, max_waiting=10, retry_after_s=1)
    first, second, third, fourth = (admission.enter() for _ in range(4))
    assert first.admitted and second.admitted
    assert (third.position, fourth.position) == (1, 2)
    first.release()
    assert third.admitted and fourth.position == 1
    assert admission.in_flight == 2 and admission.waiting == 1


def test_a_full_line_sheds_with_a_retry_hint() -> None:
    admission = Admission(max_in_flight=1, max_waiting=1, retry_after_s=3)
    admission.enter()
    admission.enter()
    with pytest.raises(ResourceExhausted) as caught:
        admission.enter()
    assert caught.value.retry_after_s == 3


def test_a_waiter_that_leaves_frees_its_place_at_once() -> None:
    admission = Admission(max_in_flight=1, max_waiting=10, retry_after_s=1)
    holder, leaving, staying = admission.enter(), admission.enter(), admission.enter()
    leaving.release()
    leaving.release()  # twice is harmless
    assert staying.position == 1 and admission.waiting == 1
    holder.release()
    assert staying.admitted and admission.in_flight == 1


async def test_waiters_hear_each_new_position_until_admitted() -> None:
    admission = Admission(max_in_flight=1, max_waiting=10, retry_after_s=1)
    holders = [admission.enter() for _ in range(3)]  # one in flight, two ahead in line
    waiter = admission.enter()
    heard = asyncio.create_task(next_positions(waiter, 3))
    await asyncio.sleep(0)
    for holder in holders:
        holder.release()
        await asyncio.sleep(0)
    assert await asyncio.wait_for(heard, 1) == [3, 2, 1]
    assert waiter.admitted
