"""Pushes waiting for their handler: one queue per sending connection, bounded.

A :class:`PushInbox` keeps the order the protocol promises (pushes from one
connection are handled one after another, in arrival order) and the bounds
it needs: each connection's queue holds at most ``Settings.max_queued_pushes``
pushes and ``max_queued_push_bytes`` bytes, and every queued push is charged
to the instance's own budget too (shared with the calls being served). A
push past a bound is refused; the caller answers it ``overloaded`` and the
publisher counts it undelivered.

Refusals are logged once per *episode*: one line when a queue starts
refusing, and one when it takes pushes again saying how many were refused
(``refused`` in the line's extras). Both go through the server's
:class:`~meshkit.untrusted.LogThrottle`, so many connections, or a queue that
flips between full and not, still write one line per interval.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from . import wire
from .budget import Budget
from .config import Settings
from .untrusted import LogThrottle

__all__ = ["PushInbox"]

# run(identity, header, payload, received at) handles one push and answers it.
RunPush = Callable[[bytes, wire.Header, Any, float], Awaitable[None]]
# spawn(coroutine, on_done) runs a task counted in flight; on_done runs when it ends.
Spawn = Callable[[Coroutine[Any, Any, None], Callable[[], None]], None]


class _Queue:
    __slots__ = ("budget", "items", "refused")

    def __init__(self, settings: Settings) -> None:
        self.items: deque[tuple[wire.Header, Any, float, int]] = deque()  # header, payload, received, cost
        self.budget = Budget(settings.max_queued_pushes, settings.max_queued_push_bytes)
        self.refused = 0  # pushes refused in the current episode


class PushInbox:
    """The push queues of one server; ``held`` is the instance's budget."""

    def __init__(self, settings: Settings, held: Budget, throttle: LogThrottle, run: RunPush,
                 spawn: Spawn) -> None:
        self._settings = settings
        self._held = held
        self._throttle = throttle
        self._run = run
        self._spawn = spawn
        self._queues: dict[bytes, _Queue] = {}

    @property
    def busy(self) -> bool:
        """Whether any push is queued or being handled."""
        return bool(self._queues)

    def queued(self, identity: bytes) -> tuple[int, int]:
        """``(pushes, bytes)`` held for one connection (for tests and introspection)."""
        queue = self._queues.get(identity)
        return (queue.budget.count, queue.budget.bytes) if queue is not None else (0, 0)

    def refuse_early(self, identity: bytes, cost: int) -> str | None:
        """Why a push of at least ``cost`` bytes would be refused (and count it refused), or None.

        Lets the caller refuse a flood before paying for decoding it.
        """
        queue = self._queues.get(identity)
        return self._refusal(queue, cost)

    def offer(self, identity: bytes, header: wire.Header, payload: Any, cost: int) -> str | None:
        """Queue a decoded push costing ``cost`` bytes; return None, or why it was refused (short text)."""
        queue = self._queues.get(identity)
        why = self._refusal(queue, cost)
        if why is not None:
            return why
        fresh = queue is None
        if queue is None:
            queue = _Queue(self._settings)
        elif queue.refused:
            self._episode_over(queue)
        queue.budget.take(cost)
        self._held.take(cost)
        queue.items.append((header, payload, time.monotonic(), cost))
        if fresh:
            self._queues[identity] = queue
            self._spawn(self._drain(identity, queue), functools.partial(self._forget, identity, queue))
        return None

    def _refusal(self, queue: _Queue | None, cost: int) -> str | None:
        if queue is not None and not queue.budget.fits(cost):
            why = (f"{queue.budget.count} pushes ({queue.budget.bytes} bytes) from this connection "
                   "wait for their handler")
            return self._refuse(queue, why)
        if not self._held.fits(cost):
            why = f"the instance holds {self._held.count} requests ({self._held.bytes} bytes)"
            return self._refuse(queue, why)
        return None

    def _refuse(self, queue: _Queue | None, why: str) -> str:
        if queue is None or not queue.refused:
            self._throttle.log("overloaded.push", logging.WARNING, "refusing pushes until they drain: %s", why)
        if queue is not None:
            queue.refused += 1
        return why

    def _episode_over(self, queue: _Queue) -> None:
        self._throttle.log("overloaded.push.over", logging.WARNING,
                           "push queue of one connection takes pushes again; %d were refused meanwhile",
                           queue.refused, extra={"refused": queue.refused})
        queue.refused = 0

    async def _drain(self, identity: bytes, queue: _Queue) -> None:
        try:
            while queue.items:
                header, payload, received, cost = queue.items[0]
                try:
                    await self._run(identity, header, payload, received)
                finally:
                    queue.items.popleft()
                    queue.budget.give(cost)
                    self._held.give(cost)
        finally:
            # At once, not in a done callback: a push arriving in between
            # would join a queue nobody drains any more.
            self._forget(identity, queue)

    def _forget(self, identity: bytes, queue: _Queue) -> None:
        """The queue's task ended (or was cancelled unstarted): unregister it, give back what it held."""
        if self._queues.get(identity) is queue:
            del self._queues[identity]
        while queue.items:
            cost = queue.items.popleft()[3]
            queue.budget.give(cost)
            self._held.give(cost)
        if queue.refused:
            self._episode_over(queue)
