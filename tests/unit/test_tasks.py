"""Supervised background tasks restart after a crash and stop when cancelled."""

from __future__ import annotations

import asyncio

from meshkit.tasks import supervise


def test_a_crashing_loop_is_restarted_and_recorded() -> None:
    runs = []

    async def loop_body() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RecursionError("maximum recursion depth exceeded")
        await asyncio.Event().wait()

    async def main() -> None:
        async def no_sleep(_: float) -> None:
            await asyncio.sleep(0)

        crashes = []
        state = supervise("watch", loop_body, sleep=no_sleep, on_crash=crashes.append)
        for _ in range(100):
            if len(runs) >= 3:
                break
            await asyncio.sleep(0)
        assert len(runs) == 3
        assert state.restarts == 2 and len(crashes) == 2
        assert crashes[0].error.startswith("RecursionError")
        state.cancel()
        await asyncio.gather(state.task, return_exceptions=True)
        assert state.task is not None and state.task.cancelled()

    asyncio.run(main())


def test_a_loop_that_returns_is_not_restarted() -> None:
    runs = []

    async def once() -> None:
        runs.append(1)

    async def main() -> None:
        state = supervise("once", once)
        assert state.task is not None
        await state.task
        assert runs == [1] and state.restarts == 0

    asyncio.run(main())
