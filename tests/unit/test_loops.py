"""meshkit's event loop: uvloop (an install requirement), and ``loops.run`` behaving like ``asyncio.run``."""

from __future__ import annotations

import asyncio

import uvloop

from meshkit import loops


def test_meshkit_runs_on_uvloop() -> None:
    assert loops.loop_factory() is uvloop.new_event_loop
    assert loops.loop_name() == "uvloop"
    loop = loops.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_run_returns_the_result_and_cancels_what_is_left() -> None:
    left: list[asyncio.Task[None]] = []

    async def forever() -> None:
        await asyncio.Event().wait()

    async def main() -> str:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        left.append(asyncio.ensure_future(forever()))
        await asyncio.sleep(0)
        return "done"

    assert loops.run(main()) == "done"
    assert left[0].cancelled()


def test_run_on_another_kind_of_loop() -> None:
    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loops.run(kind(), factory=asyncio.new_event_loop).startswith("asyncio")
