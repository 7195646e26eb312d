"""Long-running background tasks that survive bad data.

A watch loop, a heartbeat, a rescan, a sync round or a gateway sweep must
never die silently because one message or one record was malformed. Each
such loop is started with :func:`supervise`: the loop itself catches and logs
what it can per item, and the supervisor restarts the whole coroutine if an
exception escapes anyway (logged once per distinct error, with a growing
back-off from ``min_backoff`` up to ``max_backoff`` seconds, reset after the
loop has run quietly for ``healthy_after`` seconds). Cancelling the
supervisor's task stops it; a loop that returns normally is not restarted.

Every restart is counted in :attr:`Supervised.restarts` and reported through
the optional ``on_crash`` callback (the service records it for introspection
and metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .untrusted import clip

__all__ = ["Crash", "Supervised", "supervise"]

log = logging.getLogger("meshkit.tasks")


@dataclass(frozen=True)
class Crash:
    """One escaped exception: which task, when (monotonic), and what."""

    task: str
    at: float
    error: str


@dataclass
class Supervised:
    """The state of one supervised loop (its asyncio task is :attr:`task`)."""

    name: str
    task: asyncio.Task[None] | None = None
    restarts: int = 0
    crashes: list[Crash] = field(default_factory=list)  # the last few, newest last

    def cancel(self) -> None:
        """Stop the loop and its supervisor."""
        if self.task is not None:
            self.task.cancel()


MAX_KEPT_CRASHES = 8


def supervise(
    name: str,
    factory: Callable[[], Awaitable[None]],
    *,
    logger: logging.Logger = log,
    min_backoff: float = 0.1,
    max_backoff: float = 5.0,
    healthy_after: float = 30.0,
    on_crash: Callable[[Crash], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Supervised:
    """Run ``factory()`` in a new task and restart it whenever an exception escapes it.

    Must be called with a running event loop. Returns the :class:`Supervised`
    record; cancel it (or its ``task``) to stop. ``CancelledError`` is never
    treated as a crash.
    """
    state = Supervised(name)

    async def run() -> None:
        backoff = min_backoff
        last_error = ""
        while True:
            started = clock()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything from bad data (RecursionError included) restarts the loop
                if clock() - started >= healthy_after:
                    backoff = min_backoff
                error = f"{type(exc).__name__}: {clip(str(exc))}"
                crash = Crash(name, clock(), error)
                state.restarts += 1
                state.crashes.append(crash)
                del state.crashes[:-MAX_KEPT_CRASHES]
                if error != last_error:
                    logger.error("background task %s crashed; restarting it in %.1f s", name, backoff,
                                 exc_info=exc, extra={"task": name, "restarts": state.restarts})
                    last_error = error
                if on_crash is not None:
                    try:
                        on_crash(crash)
                    except Exception:  # a failing observer must not stop the supervisor
                        logger.exception("crash callback of %s failed", name)
                await sleep(backoff)
                backoff = min(backoff * 2, max_backoff)

    state.task = asyncio.get_running_loop().create_task(run(), name=name)
    return state
