"""The rest of a coroutine already stepped once: what a task, or an ``await``, goes on with.

Two places run a coroutine's first step themselves, before anything else
is paid for: :func:`meshkit.timing.run_with_deadline` (a handler that
returns without suspending arms no deadline timer) and
:func:`meshkit.gateway.eager.start` (a lone request sends its mesh call in
the turn that read it). Both then need "the rest of ``coro``, which
yielded ``first``", as something a task runs or a coroutine awaits; this
module is that one thing.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["Stepped"]


class Stepped(Coroutine[Any, Any, Any]):
    """The rest of ``coro``, whose first step yielded ``first`` (the future it waits on).

    Its first step gives ``first`` back (a task then waits on it, as if
    ``coro`` had yielded it to that task); later steps, values and thrown
    exceptions go to ``coro``. Not a native coroutine, because a task
    cancelled before its first step throws into it, and an unstarted
    ``async def`` would end without passing the cancellation on: the started
    ``coro`` would be left at its ``await``, its ``finally`` clauses unrun.
    Usable as a task's coroutine and with ``await``.
    """

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:
            self._started = True
            first, self._first = self._first, None
            if getattr(first, "_asyncio_future_blocking", None) is False:
                # As it was when yielded: a caller that took the future's await over
                # (meshkit.gateway.eager) cleared it; the task that takes it now sets it back.
                first._asyncio_future_blocking = True
            return first
        return self._coro.send(value)

    def __next__(self) -> Any:  # what a task's step calls for send(None)
        return self.send(None)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._started = True
        self._first = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        return self  # type: ignore[return-value]  # an iterator with send and throw, as a generator is
