"""meshkit.gateway.eager: a coroutine started in the caller's turn, then a task (no network, no sleeps)."""

from __future__ import annotations

import asyncio
import contextvars
import sys

import pytest

from meshkit.gateway import eager

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="a plain task on Python 3.10")

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def run_on_both_loops(main: object) -> None:
    """Run ``main()`` on asyncio's loop and on uvloop (what meshkit runs), if installed."""
    factories = [asyncio.new_event_loop]
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factories.append(uvloop.new_event_loop)
    for factory in factories:
        loop = factory()
        try:
            loop.run_until_complete(main())  # type: ignore[operator]
        finally:
            loop.close()


def test_it_runs_up_to_the_first_wait_at_once_and_a_task_goes_on() -> None:
    async def main() -> None:
        steps: list[str] = []
        gate = asyncio.get_running_loop().create_future()

        async def work() -> str:
            steps.append("before")
            await gate
            steps.append("after")
            return "done"

        task = eager.start(work())
        assert steps == ["before"] and task is not None and not task.done()
        gate.set_result(None)
        assert await task == "done" and steps == ["before", "after"]

    run_on_both_loops(main)


def test_context_variables_stay_its_own_and_reset_after_the_wait() -> None:
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()

        async def work() -> str:
            token = VAR.set("mine")
            await gate
            seen = VAR.get()
            VAR.reset(token)  # a token works only in the context that made it
            return seen

        task = eager.start(work())
        assert VAR.get() == "unset" and task is not None
        gate.set_result(None)
        assert await task == "mine"

    run_on_both_loops(main)


def test_a_cancel_before_the_tasks_first_step_reaches_the_started_coroutine() -> None:
    async def main() -> None:
        seen: list[str] = []
        gate = asyncio.get_running_loop().create_future()

        async def work() -> None:
            try:
                await gate
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("finally")

        task = eager.start(work())
        assert task is not None
        task.cancel()  # before the loop ran the task at all
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled", "finally"]

    run_on_both_loops(main)


def test_several_started_coroutines_may_wait_on_one_future() -> None:
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()

        async def work(n: int) -> int:
            await gate
            return n

        tasks = [eager.start(work(n)) for n in range(3)]
        gate.set_result(None)
        assert await asyncio.gather(*[t for t in tasks if t is not None]) == [0, 1, 2]

    run_on_both_loops(main)


def test_one_that_never_waits_returns_none_and_one_that_raises_a_failed_future() -> None:
    async def main() -> None:
        async def quick() -> int:
            return 1

        async def broken() -> None:
            raise KeyError("x")

        assert eager.start(quick()) is None
        failed = eager.start(broken())
        assert failed is not None and isinstance(failed.exception(), KeyError)

    run_on_both_loops(main)
