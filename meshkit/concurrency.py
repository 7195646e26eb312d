"""Concurrency limits with a bounded queue: how many calls run at once, and who waits.

A :class:`Gate` lets at most ``limit`` calls run at once. A call that finds
every slot taken waits in a FIFO queue, which is bounded both in calls
(``max_queued``) and in the bytes those calls hold (``max_queued_bytes``);
a call that does not fit in the queue either is refused at once with
:class:`Shed` (nothing ran, so the caller may send it elsewhere). A waiting
call leaves the queue when its deadline passes (``DeadlineCancel``) or its
task is cancelled, and a slot handed to a task cancelled in that same moment
is passed on, never lost.

One gate exists per limited method (``@rpc(max_concurrency=...)``) and one
per service (``Settings.max_concurrency``); a call passes its method's gate,
then the service's, always in that order, so two gates can never wait on
each other.

Everything runs on the event loop thread; nothing here is thread-safe, and
nothing needs to be (plain handlers reach the executor only after the gates).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from .clock import Clock
from .timing import DeadlineCancel

__all__ = ["Gate", "Shed"]


class Shed(Exception):
    """The call was refused before it ran: its gate's queue is full (the message says which bound)."""


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    cost: int


class Gate:
    """At most ``limit`` calls at once; at most ``max_queued`` calls and ``max_queued_bytes`` waiting.

    ``limit`` 0 means unlimited (the gate only counts). ``name`` appears in
    refusals (``"method pay"``, ``"service payments"``).
    """

    def __init__(self, name: str, limit: int, max_queued: int, max_queued_bytes: int) -> None:
        if limit < 0 or max_queued < 0 or max_queued_bytes < 0:
            raise ValueError("gate limits must be non-negative")
        self.name = name
        self.limit = limit
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.running = 0
        self.queued_bytes = 0
        self.shed = 0  # calls refused so far
        self._waiters: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return len(self._waiters)

    @property
    def load(self) -> int:
        """Calls running plus calls waiting: what an instance reports to callers choosing by load."""
        return self.running + len(self._waiters)

    async def enter(self, cost: int, deadline: float | None, clock: Clock) -> None:
        """Take a slot, waiting in the queue if need be; pair every return with :meth:`leave`.

        Raises :class:`Shed` at once (before any await) when the call can neither
        run nor queue, and ``DeadlineCancel`` when ``deadline`` (``clock``
        time) passes while it waits.
        """
        if not self.limit or (self.running < self.limit and not self._waiters):
            self.running += 1
            return
        if len(self._waiters) >= self.max_queued:
            self.shed += 1
            raise Shed(f"{self.name}: {self.running} calls running (limit {self.limit}) "
                       f"and {len(self._waiters)} queued (limit {self.max_queued})")
        if self.queued_bytes + cost > self.max_queued_bytes:
            self.shed += 1
            raise Shed(f"{self.name}: {self.running} calls running (limit {self.limit}) and "
                       f"{self.queued_bytes} bytes queued (limit {self.max_queued_bytes})")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost)
        timer = None
        if deadline is not None:
            left = deadline - clock.now()
            if left <= 0:
                raise DeadlineCancel()
            timer = clock.call_later(left, _expire, waiter.future)
        self._waiters.append(waiter)
        self.queued_bytes += cost
        try:
            await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        # The slot was handed over by leave(), which left it counted running.

    def leave(self) -> None:
        """Give back a slot taken by :meth:`enter`; the oldest waiter gets it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            self.queued_bytes -= waiter.cost
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes to it: running stays the same
                return
        self.running -= 1

    def _abandon(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            # leave() handed this waiter a slot just as it gave up: pass it on.
            self.leave()
            return
        waiter.future.cancel()
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self.queued_bytes -= waiter.cost


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(DeadlineCancel())
