"""The event loop meshkit runs on: uvloop where it is installed, asyncio's own otherwise.

uvloop (libuv under the asyncio API) roughly halves the cost of each loop
iteration, and a mesh call is a handful of them on each side: measured in
``docs/performance.md``. It is an install requirement; the fallback exists
only for platforms without a wheel (Windows, PyPy), where meshkit runs on
the standard loop unchanged.

Only what meshkit itself starts uses this: :func:`meshkit.runner.run` (every
``meshkit run`` service and gateway) and the background thread of the
blocking :class:`~meshkit.Client`. An application that runs
:class:`~meshkit.AsyncClient` on its own loop chooses that loop itself
(``meshkit.loops.run(main())`` gives it the same one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_uvloop_factory: Callable[[], asyncio.AbstractEventLoop] | None
try:
    import uvloop
except ImportError:  # no wheel for this platform: the standard loop
    _uvloop_factory = None
else:
    _uvloop_factory = uvloop.new_event_loop

__all__ = ["loop_factory", "loop_name", "new_event_loop", "run"]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes meshkit's event loops: ``uvloop.new_event_loop``, or ``asyncio.new_event_loop``."""
    return _uvloop_factory or asyncio.new_event_loop


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop :func:`new_event_loop` makes."""
    return "asyncio" if loop_factory() is asyncio.new_event_loop else "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of meshkit's kind (not set as the current one)."""
    return loop_factory()()


def run(main: Coroutine[Any, Any, T], *,
        factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> T:
    """``asyncio.run(main)`` on meshkit's kind of loop (or on one ``factory`` makes)."""
    loop = (factory or loop_factory())()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(_finishing(loop, main))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _finishing(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, T]) -> T:
    # What asyncio.run does after ``main``: cancel what is left, close async generators.
    try:
        return await main
    finally:
        rest = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()
