"""Start a coroutine now, in the caller's turn of the event loop; a task goes on with it once it waits.

``asyncio.ensure_future(coro)`` runs nothing of ``coro`` before the loop's
next turn (Python 3.12's eager tasks change that; meshkit runs on 3.10 and
3.11 too). A client's request does everything up to its mesh call's send before it
first waits (parse, route, encode, send), so starting it at once sends the
call a loop turn sooner; with one request in flight, that turn was all
latency (measured in the gateway's sequential benchmark, ``bench/edge.py``).

Contract of :func:`start`:

* ``coro`` runs up to its first wait before :func:`start` returns, in a copy
  of the caller's context (what it sets in context variables stays its own,
  as in a task). A task goes on with it from there, in that same context,
  and is returned; it is cancelled like any task: the cancellation is thrown
  in at the ``await`` the coroutine waits on. (On Python 3.10, whose tasks
  cannot be given a context, it is a plain task, started at the next turn.)
* Before that first wait ``coro`` runs in no task: ``asyncio.current_task()``
  is the caller's (None in a protocol callback). Code that needs its own task
  there (``asyncio.timeout``) must not be started this way.
* If ``coro`` finishes without waiting, :func:`start` returns None (the
  result is dropped: start only coroutines that run for their effects); if
  it raises, a done future holding the exception (cancelled, for a
  cancellation), as a task would have. ``KeyboardInterrupt`` and
  ``SystemExit`` propagate.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any

from ..stepped import Stepped

__all__ = ["start"]


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any] | None:
    """Run ``coro`` up to its first wait now; the task that goes on with it, or None (see the module doc)."""
    if sys.version_info < (3, 11):  # no context= for a task: the rest could not reset what the start set
        return asyncio.ensure_future(coro)
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration:
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # what a task would hold: whoever tracks it sees it (or asyncio logs it)
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if isinstance(exc, asyncio.CancelledError):
            failed.cancel()
        else:
            failed.set_exception(exc)
        return failed
    if getattr(waiting, "_asyncio_future_blocking", False):
        # What a task does as it takes the future: until then no other coroutine
        # could await it (a future refuses a second await while the flag is set).
        waiting._asyncio_future_blocking = False
    # The same context, not a copy: a context variable set before the wait is reset after it
    # (a span's ``with``), and a token is valid only in the context that made it.
    return asyncio.get_running_loop().create_task(Stepped(coro, waiting), context=context)

