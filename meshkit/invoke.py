"""Running one handler with the arguments a peer sent, under its deadline.

:func:`invoke` runs an ``async`` handler in the current task (cancelled at
the deadline, raising :class:`~meshkit.timing.DeadlineCancel`) and a plain
one in the executor (not started if its deadline passed while it waited for a
thread). Arguments that do not fit the handler raise :class:`BadArguments`
with a short text: a keyword name is the peer's choice, and may be megabytes.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from .clock import SYSTEM_CLOCK, Clock
from .handlers import Handler
from .timing import DeadlineCancel, run_with_deadline
from .untrusted import clip

__all__ = ["BadArguments", "invoke"]

# Characters kept of a bad-arguments explanation (it may quote keyword names).
_PROBLEM_LIMIT = 500


class BadArguments(Exception):
    """The arguments do not fit the handler's signature (the message says why, clipped)."""


async def invoke(handler: Handler, args: list[Any], kwargs: dict[str, Any], deadline: float | None,
                 executor: Executor, clock: Clock = SYSTEM_CLOCK) -> Any:
    """Run ``handler(*args, **kwargs)`` and return its result (see the module doc).

    ``deadline`` is in ``clock`` time.
    """
    if handler.is_async:
        try:
            coro = handler.fn(*args, **kwargs)
        except TypeError as exc:
            # Calling a coroutine function only binds the arguments, so a
            # TypeError here is always the caller's.
            raise BadArguments(clip(str(exc), _PROBLEM_LIMIT)) from None
        if deadline is None:
            return await coro
        return await run_with_deadline(coro, deadline, clock)
    problem = handler.check_arguments(args, kwargs)
    if problem is not None:
        raise BadArguments(clip(problem, _PROBLEM_LIMIT))
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        executor, contextvars.copy_context().run, _run_plain, handler.fn, args, kwargs, deadline, clock
    )


def _run_plain(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], deadline: float | None,
               clock: Clock) -> Any:
    if deadline is not None and clock.now() >= deadline:
        raise DeadlineCancel()
    return fn(*args, **kwargs)
