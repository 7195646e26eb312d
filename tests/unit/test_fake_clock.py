"""FakeClock: time moves only on advance(), callbacks and sleepers fall due in order."""

from __future__ import annotations

import asyncio

import pytest

from meshkit.clock import Clock
from meshkit.testing import FakeClock


def test_time_moves_only_when_advanced() -> None:
    clock = FakeClock(100.0)
    assert clock.now() == 100.0
    clock.advance(0.5)
    assert clock.now() == 100.5
    with pytest.raises(ValueError, match="cannot advance"):
        clock.advance(-1)


def test_a_fake_clock_is_a_clock() -> None:
    clock: Clock = FakeClock()
    assert isinstance(clock.now(), float)


def test_callbacks_run_in_due_order_each_at_its_own_time() -> None:
    clock = FakeClock(0.0)
    seen: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: seen.append(("b", clock.now())))
    clock.call_later(1.0, lambda: seen.append(("a", clock.now())))
    clock.call_later(2.0, lambda: seen.append(("c", clock.now())))  # a tie keeps scheduling order
    clock.call_later(5.0, lambda: seen.append(("late", clock.now())))
    assert clock.pending == 4 and clock.next_due() == 1.0
    assert clock.advance(3.0) == 3
    assert seen == [("a", 1.0), ("b", 2.0), ("c", 2.0)]
    assert clock.now() == 3.0 and clock.pending == 1


def test_a_cancelled_callback_never_runs_and_cancel_after_running_is_a_no_op() -> None:
    clock = FakeClock(0.0)
    seen: list[str] = []
    clock.call_later(1.0, seen.append, "cancelled").cancel()
    ran = clock.call_later(1.0, seen.append, "ran")
    clock.advance(1.0)
    ran.cancel()
    assert seen == ["ran"] and clock.next_due() is None


def test_a_callback_scheduled_by_a_callback_runs_in_the_same_advance_if_due() -> None:
    clock = FakeClock(0.0)
    seen: list[float] = []

    def first() -> None:
        seen.append(clock.now())
        clock.call_later(1.0, lambda: seen.append(clock.now()))

    clock.call_later(1.0, first)
    clock.advance(2.5)
    assert seen == [1.0, 2.0]


def test_sleepers_wake_in_order_and_only_when_advanced() -> None:
    async def main() -> list[str]:
        clock = FakeClock(0.0)
        woke: list[str] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(name)

        tasks = [asyncio.ensure_future(sleeper("two", 2.0)), asyncio.ensure_future(sleeper("one", 1.0))]
        await asyncio.sleep(0)
        assert clock.pending == 2
        clock.advance(0.5)
        await asyncio.sleep(0)
        assert woke == []
        clock.advance(5.0)
        await asyncio.gather(*tasks)
        return woke

    assert asyncio.run(main()) == ["one", "two"]


def test_a_cancelled_sleeper_leaves_nothing_scheduled() -> None:
    async def main() -> int:
        clock = FakeClock(0.0)
        task = asyncio.ensure_future(clock.sleep(10.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return clock.pending

    assert asyncio.run(main()) == 0
