"""The system clock reads monotonic time, schedules on the running loop and sleeps."""

from __future__ import annotations

import asyncio
import time

from meshkit.clock import SYSTEM_CLOCK


def test_system_clock_is_monotonic_time() -> None:
    before = time.monotonic()
    assert before <= SYSTEM_CLOCK.now() <= time.monotonic()


def test_system_clock_schedules_and_cancels_on_the_running_loop() -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        done = asyncio.Event()
        SYSTEM_CLOCK.call_later(0, fired.append, "ran")
        SYSTEM_CLOCK.call_later(0, done.set)
        SYSTEM_CLOCK.call_later(0, fired.append, "cancelled").cancel()
        await done.wait()
        await SYSTEM_CLOCK.sleep(0)
        return fired

    assert asyncio.run(main()) == ["ran"]
