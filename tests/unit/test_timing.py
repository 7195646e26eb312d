"""wait_event and run_with_deadline: time-outs on an injected clock, outside cancellations never swallowed."""

from __future__ import annotations

import asyncio

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
