"""wait_event and run_with_deadline: time-outs on an injected clock, outside cancellations never swallowed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshkit.testing import FakeClock
from meshkit.timing import DeadlineCancel, run_with_deadline, wait_event


def test_wait_event_returns_true_at_once_when_set() -> None:
    async def main() -> bool:
        event = asyncio.Event()
        event.set()
        return await wait_event(event, 0.0, FakeClock())

    assert asyncio.run(main())


def test_wait_event_times_out_only_when_the_clock_passes_the_timeout() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        event = asyncio.Event()
        waiter = asyncio.ensure_future(wait_event(event, 2.0, clock))
        await asyncio.sleep(0)
        clock.advance(1.9)
        await asyncio.sleep(0)
        assert not waiter.done()
        clock.advance(0.1)
        assert await waiter is False
        assert clock.pending == 0  # the timer is gone

    asyncio.run(main())


def test_wait_event_wakes_when_the_event_is_set_and_cancels_its_timer() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        event = asyncio.Event()
        waiter = asyncio.ensure_future(wait_event(event, 60.0, clock))
        await asyncio.sleep(0)
        event.set()
        assert await waiter is True
        assert clock.pending == 0

    asyncio.run(main())


def test_wait_event_without_timeout_waits_for_the_event() -> None:
    async def main() -> bool:
        event = asyncio.Event()
        asyncio.get_running_loop().call_soon(event.set)
        return await wait_event(event, None, FakeClock())

    assert asyncio.run(main())


def test_a_cancellation_from_outside_is_not_taken_for_a_time_out() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        waiter = asyncio.ensure_future(wait_event(asyncio.Event(), 5.0, clock))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert clock.pending == 0

    asyncio.run(main())


def test_run_with_deadline_returns_the_result_before_the_deadline() -> None:
    async def work() -> str:
        return "done"

    async def main() -> str:
        clock = FakeClock(0.0)
        result = await run_with_deadline(work(), 1.0, clock)
        assert clock.pending == 0
        return str(result)

    assert asyncio.run(main()) == "done"


def test_run_with_deadline_cancels_the_work_at_its_deadline() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = asyncio.ensure_future(run_with_deadline(forever(), 3.0, clock))
        await asyncio.sleep(0)
        clock.advance(2.0)
        await asyncio.sleep(0)
        assert not task.done()
        clock.advance(1.0)
        with pytest.raises(DeadlineCancel):
            await task
        assert cancelled.is_set()

    asyncio.run(main())


def test_run_with_deadline_lets_an_outside_cancellation_through() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        task = asyncio.ensure_future(run_with_deadline(asyncio.Event().wait(), 3.0, clock))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clock.pending == 0

    asyncio.run(main())


def test_run_with_deadline_arms_no_timer_for_work_that_never_suspends() -> None:
    armed: list[float] = []

    class Watching(FakeClock):
        def call_later(self, delay: float, callback: Any, *args: Any) -> Any:
            armed.append(delay)
            return super().call_later(delay, callback, *args)

    async def quick() -> int:
        return 7

    async def fails() -> None:
        raise KeyError("k")

    async def main() -> None:
        clock = Watching(0.0)
        assert await run_with_deadline(quick(), 1.0, clock) == 7
        with pytest.raises(KeyError):
            await run_with_deadline(fails(), 1.0, clock)
        assert armed == []
        clock.advance(0.25)

        async def slow() -> str:
            await asyncio.sleep(0)  # yields to the loop (None), then waits on futures
            await asyncio.sleep(0)
            return "late"

        assert await run_with_deadline(slow(), 1.0, clock) == "late"
        assert armed == [0.75] and clock.pending == 0  # armed for the same deadline, then cancelled

    asyncio.run(main())


def test_run_with_deadline_passes_values_and_errors_through_every_suspension() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]

        async def work() -> list[Any]:
            got = [await futures[0]]
            try:
                await futures[1]
            except ValueError as exc:
                got.append(str(exc))
            got.append(await futures[2])
            return got

        task = asyncio.ensure_future(run_with_deadline(work(), 5.0, clock))
        await asyncio.sleep(0)
        futures[0].set_result("a")
        await asyncio.sleep(0)
        futures[1].set_exception(ValueError("b"))
        await asyncio.sleep(0)
        futures[2].set_result("c")
        assert await task == ["a", "b", "c"]
        assert clock.pending == 0

    asyncio.run(main())


def test_run_with_deadline_cancels_work_that_suspended_after_a_first_step() -> None:
    async def main() -> None:
        clock = FakeClock(0.0)
        seen: list[str] = []

        async def steps() -> None:
            seen.append("first")
            await asyncio.sleep(0)
            seen.append("second")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        task = asyncio.ensure_future(run_with_deadline(steps(), 2.0, clock))
        for _ in range(3):
            await asyncio.sleep(0)
        assert seen == ["first", "second"] and clock.pending == 1
        clock.advance(2.0)
        with pytest.raises(DeadlineCancel):
            await task
        assert seen == ["first", "second", "cancelled"]

    asyncio.run(main())
