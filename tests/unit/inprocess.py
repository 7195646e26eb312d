"""A service for the in-process tests, and helpers to run one under a ServiceHarness."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import meshkit
from meshkit.config import Settings
from meshkit.testing import FakeClock, ServiceHarness

T = TypeVar("T")

WAIT = 10.0  # seconds a positive signal may take on a busy machine


class Shop(meshkit.Service):
    """Quick, plain, failing and gated handlers, a subscription and a periodic task."""

    name = "shop"
    version = "1.0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.jobs: list[Any] = []
        self.got_job = asyncio.Event()
        self.ticks = 0
        self.ticked = asyncio.Event()
        self.events: list[str] = []

    async def on_start(self) -> None:
        self.events.append("start")

    async def on_drain(self, grace: float) -> None:
        self.events.append(f"drain {grace}")

    async def on_stop(self) -> None:
        self.events.append("stop")

    @meshkit.rpc
    async def echo(self, value: Any) -> Any:
        return value

    @meshkit.rpc
    def double(self, value: int) -> int:
        return value * 2

    @meshkit.rpc
    async def fail(self, text: str) -> None:
        raise ValueError(text)

    @meshkit.rpc
    async def context(self) -> dict[str, Any]:
        ctx = meshkit.current_call()
        assert ctx is not None
        return {"name": ctx.name, "meta": dict(ctx.meta), "deadline": ctx.deadline}

    @meshkit.rpc
    async def hold(self) -> str:
        self.holding.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "released"

    @meshkit.subscribe("jobs.*")
    async def on_job(self, payload: Any) -> None:
        self.jobs.append(payload)
        self.got_job.set()

    @meshkit.periodic(1.0)
    async def tick(self) -> None:
        self.ticks += 1
        self.ticked.set()


def run(test: Callable[[ServiceHarness[Shop]], Coroutine[Any, Any, T]], **settings: Any) -> T:
    """Run ``test(harness)`` with a started :class:`Shop` on a fresh FakeClock."""
    async def main() -> T:
        async with ServiceHarness(Shop, clock=FakeClock(), settings=Settings(**settings)) as h:
            return await test(h)
    return asyncio.run(main())


async def signalled(event: asyncio.Event) -> None:
    """Wait for ``event`` (a positive signal), failing the test after :data:`WAIT` seconds."""
    await asyncio.wait_for(event.wait(), WAIT)


async def turns(n: int = 5) -> None:
    """Give the loop ``n`` turns (woken sleepers resume at the next ones)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def advance_until_done(clock: FakeClock, task: asyncio.Future[T], step: float, limit: int = 100) -> T:
    """Advance ``clock`` by ``step`` and give the loop turns until ``task`` is done; return its result.

    Robust to the loop's order: a sleeper that had not yet started when one
    step was made is woken by the next.
    """
    for _ in range(limit):
        if task.done():
            break
        clock.advance(step)
        await turns()
    return await asyncio.wait_for(task, WAIT)
