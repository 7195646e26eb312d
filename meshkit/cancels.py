"""The calls an instance is serving, by sender and id, so that a CANCEL can reach them.

A CANCEL (``docs/protocol.md`` §4) names a CALL by the sender's connection
(its ROUTER identity) and the request id, which is only unique per sender.
:class:`RunningCalls` maps that pair to a :class:`Running` entry while the
call is admitted and not finished. Cancelling sets the entry's
:class:`~meshkit.context.CancelFlag` (what ``current_call().cancelled``
reads) and, for an async handler whose task has started, cancels that task;
a task that has not started yet sees the flag as its first step and ends
without running the handler (cancelling an unstarted task would skip the
bookkeeping in its ``finally``).

A plain handler's task is cancelled too while no thread runs the handler:
while it waits at its concurrency gates or for resources (no work handed to
the executor yet), or when its work is still queued in the executor and
withdrawing it succeeds (``concurrent.futures.Future.cancel`` fails once a
thread has taken it, atomically, so it then never runs). Once a thread runs
it, only the flag is set: a thread cannot be interrupted, and the call's
limits stay held until it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from .context import CancelFlag

__all__ = ["Running", "RunningCalls"]


class Running:
    """One call being served: its task, its cancellation flag, whether the task has started,
    and (a plain handler) the work handed to the executor, once it is."""

    __slots__ = ("flag", "is_async", "started", "task", "thread")

    def __init__(self, is_async: bool) -> None:
        self.task: asyncio.Task[None] | None = None
        self.flag = CancelFlag()
        self.is_async = is_async
        self.started = False
        self.thread: concurrent.futures.Future[object] | None = None


class RunningCalls:
    """The admitted calls of one server; at most one entry per (sender, id) in flight."""

    def __init__(self) -> None:
        self._calls: dict[tuple[bytes, int], Running] = {}
        self.cancelled = 0  # CANCELs that reached a running call
        self.unmatched = 0  # CANCELs for a call that had already finished (or never ran here)

    def __len__(self) -> int:
        return len(self._calls)

    def add(self, identity: bytes, request_id: int, is_async: bool) -> Running:
        """Enter a call just admitted; its owner sets :attr:`Running.task`."""
        entry = self._calls[(identity, request_id)] = Running(is_async)
        return entry

    def remove(self, identity: bytes, request_id: int, entry: Running) -> None:
        """Forget a finished call (only its own entry: a sender may reuse an id once answered)."""
        key = (identity, request_id)
        if self._calls.get(key) is entry:
            del self._calls[key]

    def cancel(self, identity: bytes, request_id: int, reason: str) -> bool:
        """Cancel the call ``request_id`` of ``identity`` for ``reason``; False if there is none."""
        entry = self._calls.pop((identity, request_id), None)
        if entry is None:
            self.unmatched += 1
            return False
        self.cancelled += 1
        entry.flag.reason = reason
        entry.flag.is_set = True
        if entry.started and entry.task is not None and (
                entry.is_async or entry.thread is None or entry.thread.cancel()):
            entry.task.cancel()
        return True
