"""Concurrency gates: at most N running, a FIFO queue bounded in calls and bytes, refusals at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from meshkit.concurrency import Gate, Shed
from meshkit.testing import FakeClock
from meshkit.timing import DeadlineCancel


def sync(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run the async test ``fn`` in a fresh event loop (the unit tests have no asyncio plugin)."""

    def test() -> None:
        asyncio.run(fn())

    test.__name__ = fn.__name__
    return test


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@sync
async def test_past_the_limit_calls_queue_in_order_and_past_the_queue_are_shed() -> None:
    clock = FakeClock()
    gate = Gate("method pay", limit=2, max_queued=2, max_queued_bytes=10_000)
    order: list[int] = []
    await gate.enter(100, None, clock)
    await gate.enter(100, None, clock)

    async def queued(i: int) -> None:
        await gate.enter(100, None, clock)
        order.append(i)

    waiters = [asyncio.ensure_future(queued(i)) for i in (1, 2)]
    await settle()
    assert (gate.running, gate.queued, gate.queued_bytes, gate.load) == (2, 2, 200, 4)
    with pytest.raises(Shed, match=r"method pay: 2 calls running \(limit 2\) and 2 queued \(limit 2\)"):
        await gate.enter(100, None, clock)
    assert gate.shed == 1
    gate.leave()
    await settle()
    assert order == [1]
    gate.leave()
    await settle()
    assert order == [1, 2] and (gate.running, gate.queued, gate.queued_bytes) == (2, 0, 0)
    await asyncio.gather(*waiters)
    gate.leave()
    gate.leave()
    assert gate.running == 0


@sync
async def test_the_queue_is_bounded_in_bytes_too() -> None:
    clock = FakeClock()
    gate = Gate("service s", limit=1, max_queued=100, max_queued_bytes=1000)
    await gate.enter(10, None, clock)
    first = asyncio.ensure_future(gate.enter(900, None, clock))
    await settle()
    with pytest.raises(Shed, match="900 bytes queued"):
        await gate.enter(200, None, clock)
    gate.leave()
    await first
    gate.leave()


@sync
async def test_a_waiter_leaves_the_queue_at_its_deadline() -> None:
    clock = FakeClock()
    gate = Gate("m", limit=1, max_queued=5, max_queued_bytes=10_000)
    await gate.enter(1, None, clock)
    waiter = asyncio.ensure_future(gate.enter(50, clock.now() + 2.0, clock))
    await settle()
    clock.advance(1.9)
    await settle()
    assert not waiter.done() and gate.queued == 1
    clock.advance(0.2)
    await settle()
    with pytest.raises(DeadlineCancel):
        await waiter
    assert (gate.queued, gate.queued_bytes, gate.running) == (0, 0, 1)
    gate.leave()
    assert gate.running == 0


@sync
async def test_a_passed_deadline_never_queues() -> None:
    clock = FakeClock()
    gate = Gate("m", limit=1, max_queued=5, max_queued_bytes=10_000)
    await gate.enter(1, None, clock)
    with pytest.raises(DeadlineCancel):
        await gate.enter(1, clock.now(), clock)
    assert gate.queued == 0


@sync
async def test_a_cancelled_waiter_frees_its_place_and_a_slot_handed_to_it_passes_on() -> None:
    clock = FakeClock()
    gate = Gate("m", limit=1, max_queued=5, max_queued_bytes=10_000)
    await gate.enter(1, None, clock)
    a = asyncio.ensure_future(gate.enter(1, None, clock))
    b = asyncio.ensure_future(gate.enter(1, None, clock))
    c = asyncio.ensure_future(gate.enter(1, None, clock))
    await settle()
    a.cancel()
    await settle()
    assert gate.queued == 2
    gate.leave()  # hands the slot to b ...
    b.cancel()  # ... which is cancelled before it runs: the slot must reach c
    await settle()
    assert c.done() and not c.cancelled()
    assert (gate.running, gate.queued) == (1, 0)
    gate.leave()
    assert gate.running == 0


@sync
async def test_limit_zero_only_counts() -> None:
    gate = Gate("service s", limit=0, max_queued=0, max_queued_bytes=0)
    for _ in range(1000):
        await gate.enter(10**6, None, FakeClock())
    assert gate.load == 1000 and gate.shed == 0
