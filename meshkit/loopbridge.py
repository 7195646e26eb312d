"""Running a coroutine on a service's event loop from one of its handler threads.

A plain (thread-pool) handler cannot ``await``; :func:`run_from_thread` hands
the coroutine to the loop and blocks the worker thread until it is done,
carrying the worker's call context (deadline, trace, metadata) along.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from .context import current_call, set_current
from .errors import ClientClosedError


def run_from_thread(loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, Any]) -> Any:
    """The result of ``coro`` run on ``loop``, waited for by the calling (worker) thread.

    ``loop`` None (the service is not running) raises :class:`ClientClosedError`;
    a call from ``loop``'s own thread raises :class:`RuntimeError`, because it
    would block the loop on itself. Either way ``coro`` is closed, never run.
    """
    if loop is None:
        coro.close()
        raise ClientClosedError("service is not running")
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        # Blocking the loop's own thread on the loop would never return.
        coro.close()
        raise RuntimeError("call_blocking/publish_blocking are for plain handlers; "
                           "an async handler should await self.call/self.publish")
    ctx = current_call()

    async def with_context() -> Any:
        # The worker thread's call context must follow the call into the loop.
        set_current(ctx)
        return await coro

    return asyncio.run_coroutine_threadsafe(with_context(), loop).result()
