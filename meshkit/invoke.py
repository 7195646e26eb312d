"""Running one handler with the arguments a peer sent, under its deadline and limits.

:func:`invoke` first checks the arguments: their types against the
handler's annotations (:mod:`meshkit.signature`, converting where
unambiguous), then their fit to its signature; arguments that do not fit
raise :class:`BadArguments` with a short text (a keyword name is the peer's
choice, and may be megabytes). Then, given ``limits``, the call passes its
method's and service's concurrency gates and takes its resources
(:mod:`meshkit.limits`), which may refuse it before it runs or make it wait,
up to its deadline. Then an ``async`` handler runs in the current task
(cancelled at the deadline, raising :class:`~meshkit.timing.DeadlineCancel`)
and a plain one in the executor (not started if its deadline passed while it
waited for a thread). Whatever the limits gave is given back when it ends.

Given the call's :class:`~meshkit.cancels.Running` entry, a plain handler's
work handed to the executor is recorded in it (:attr:`Running.thread`), so
that a CANCEL arriving before a thread picks the work up can withdraw it
(it then never runs) and end the call's wait at once.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from .cancels import Running
from .clock import SYSTEM_CLOCK, Clock
from .handlers import Handler
from .limits import CallLimits
from .signature import ArgumentTypeError
from .timing import DeadlineCancel, run_with_deadline
from .untrusted import clip

__all__ = ["BadArguments", "invoke"]

# Characters kept of a bad-arguments explanation (it may quote keyword names).
_PROBLEM_LIMIT = 500


class BadArguments(Exception):
    """The arguments do not fit the handler's signature or types (the message says why, clipped)."""


async def invoke(handler: Handler, args: list[Any], kwargs: dict[str, Any], deadline: float | None,
                 executor: Executor, clock: Clock = SYSTEM_CLOCK, *, limits: CallLimits | None = None,
                 cost: int = 0, running: Running | None = None) -> Any:
    """Run ``handler(*args, **kwargs)`` and return its result (see the module doc).

    ``deadline`` is in ``clock`` time; ``cost`` is what the call holds in
    bytes (it bounds the bytes waiting in a gate's queue).
    """
    types = handler.types
    if types is not None and types.checks:
        try:
            args, kwargs = types.apply(args, kwargs)
        except ArgumentTypeError as exc:
            raise BadArguments(clip(str(exc), _PROBLEM_LIMIT)) from None
    if limits is None:
        return await _run(handler, args, kwargs, deadline, executor, clock, running)
    await limits.enter(handler, cost, deadline)
    try:
        return await _run(handler, args, kwargs, deadline, executor, clock, running)
    finally:
        limits.leave(handler)


async def _run(handler: Handler, args: list[Any], kwargs: dict[str, Any], deadline: float | None,
               executor: Executor, clock: Clock, running: Running | None) -> Any:
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
    # What loop.run_in_executor does, keeping the executor's future: a CANCEL may withdraw it.
    work = executor.submit(contextvars.copy_context().run, _run_plain, handler.fn, args, kwargs, deadline, clock)
    if running is not None:
        running.thread = work
    return await asyncio.wrap_future(work)


def _run_plain(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], deadline: float | None,
               clock: Clock) -> Any:
    if deadline is not None and clock.now() >= deadline:
        raise DeadlineCancel()
    return fn(*args, **kwargs)
