"""A clock that moves only when the test says so (trio's ``MockClock`` is the model).

:class:`FakeClock` implements :class:`meshkit.clock.Clock`. Its time starts
at ``start`` (by default the real monotonic time when it was made, so code
that still reads the real clock agrees with it until the test advances it)
and changes only through :meth:`FakeClock.advance`, which runs every
callback and wakes every sleeper that falls due, in time order (ties in the
order they were scheduled), moving :meth:`FakeClock.now` to each one's due
time as it goes. Woken sleepers resume at the loop's next turns, so a test
awaits something (say :func:`asyncio.sleep(0) <asyncio.sleep>` a few times,
or the result it expects) after advancing.

Like ``loop.call_later``, :meth:`FakeClock.call_later` must be called from
the event loop's thread; :meth:`FakeClock.advance` runs callbacks in the
caller's thread, which for asyncio code is the loop's.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FakeClock", "FakeTimer"]


class FakeTimer:
    """A callback scheduled on a :class:`FakeClock`; :meth:`cancel` stops it."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (a no-op if it ran already)."""
        self.cancelled = True


class FakeClock:
    """Time under the test's control: ``now()``, ``call_later()``, ``sleep()`` and ``advance()``."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.monotonic() if start is None else float(start)
        self._queue: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        """The fake monotonic time: ``start`` plus everything advanced so far."""
        return self._now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        """Run ``callback(*args)`` once the clock has been advanced by ``delay`` seconds.

        A ``delay`` of zero or less runs at the next :meth:`advance` (even ``advance(0)``).
        """
        timer = FakeTimer(self._now + max(0.0, delay), callback, args)
        heapq.heappush(self._queue, (timer.when, next(self._order), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        """Return once the clock has been advanced by ``seconds`` (cancellable)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, _wake, future)
        try:
            await future
        finally:
            timer.cancel()

    def advance(self, seconds: float) -> int:
        """Move time forward by ``seconds``, running what falls due in order; return how many ran.

        Raises ``ValueError`` for a negative ``seconds``: monotonic time never goes back.
        """
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds!r} seconds")
        target = self._now + seconds
        ran = 0
        while self._queue and self._queue[0][0] <= target:
            when, _, timer = heapq.heappop(self._queue)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.cancelled = True  # it ran: a later cancel() is the no-op it promises to be
            timer.callback(*timer.args)
            ran += 1
        self._now = target
        return ran

    @property
    def pending(self) -> int:
        """How many callbacks and sleepers are waiting for time to pass."""
        return sum(1 for _, _, timer in self._queue if not timer.cancelled)

    def next_due(self) -> float | None:
        """When the next waiting callback or sleeper falls due, or None."""
        due = [when for when, _, timer in self._queue if not timer.cancelled]
        return min(due) if due else None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
