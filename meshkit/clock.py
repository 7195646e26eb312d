"""Time as a dependency: the one interface through which the core reads the time and waits.

Heartbeats, TTLs, deadlines, back-offs and rescans take a :class:`Clock`
instead of calling ``time.monotonic``, ``loop.call_later`` or
``asyncio.sleep`` themselves, so a unit test drives time with
:class:`meshkit.testing.FakeClock` instead of sleeping (trio's
``MockClock`` is the model). Production code uses :data:`SYSTEM_CLOCK`.

A clock's times are monotonic seconds; only differences between them mean
anything. :meth:`Clock.call_later` must be called from the event loop's
thread, like ``loop.call_later``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "TimerHandle"]


class TimerHandle(Protocol):
    """What :meth:`Clock.call_later` returns: a scheduled callback that can be cancelled."""

    def cancel(self) -> None:
        """Do not run the callback (a no-op if it ran already)."""


class Clock(Protocol):
    """Reads the time, schedules callbacks and sleeps."""

    def now(self) -> float:
        """The current time in monotonic seconds."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` on the running loop after ``delay`` seconds."""

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` seconds (cancellable)."""


class SystemClock:
    """The real clock: ``time.monotonic``, the running loop's ``call_later``, ``asyncio.sleep``."""

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """``asyncio.get_running_loop().call_later(delay, callback, *args)``."""
        return asyncio.get_running_loop().call_later(delay, callback, *args)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep(seconds)``."""
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
