"""``Fanout``: the gateway's one ordered queue of pushes to its client connections.

Every push the gateway accepts, a topic push for all subscribed connections
or a delivery to one connection, becomes one job in this queue, and one task
runs the jobs one after another in the order they were accepted. So push
k+1 never reaches a connection before push k, whichever kind each is.

A topic push is written in slices of ``slice_size`` connections with a
yield to the event loop after each slice: with thousands of connections the
loop still answers HAProxy's health check (``mesh.ping``) and client
requests between slices, instead of after the whole fan-out.

The queue is bounded in bytes (the sum of the queued lines): :meth:`Fanout.accept`
raises :class:`FanoutFullError` (code ``overloaded``) when a line would take
it past ``max_bytes``, and the sender is told so. A push is acknowledged to
its sender once it is accepted into the queue, not once it is written: the
ack means "queued in order for every connection here", which is what lets a
publisher's count of gateways reached stay right while a large fan-out runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..codes import ErrorCode
from ..errors import RefusedError
from ..untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.gateway")

SLICE_SIZE = 256  # connections written to between two yields to the event loop
MAX_BYTES = 32 * 1024 * 1024  # bytes of queued lines, at most


class Receiver(Protocol):
    """What a topic push needs of a connection."""

    def push(self, topic: str, line: bytes) -> bool: ...


class Sink(Protocol):
    """What a delivery needs of its connection."""

    def send(self, line: bytes) -> bool: ...


class FanoutFullError(RefusedError):
    """The gateway's push queue is full: the push was not accepted."""

    code = ErrorCode.OVERLOADED


@dataclass(frozen=True)
class _Job:
    line: bytes
    topic: str = ""  # a topic push: every subscribed connection
    target: Sink | None = None  # a delivery: this connection alone


class Fanout:
    """Runs accepted pushes in order, in slices (see the module doc)."""

    def __init__(self, connections: Callable[[], Iterable[Receiver]], throttle: LogThrottle, *,
                 max_bytes: int = MAX_BYTES, slice_size: int = SLICE_SIZE) -> None:
        if max_bytes <= 0 or slice_size <= 0:
            raise ValueError("max_bytes and slice_size must be positive")
        self._connections = connections
        self._throttle = throttle
        self.max_bytes = max_bytes
        self.slice_size = slice_size
        self._jobs: deque[_Job] = deque()
        self.queued_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def accept(self, line: bytes, *, topic: str = "", target: Sink | None = None) -> None:
        """Queue ``line`` for the connections subscribed to ``topic``, or for ``target`` alone.

        Raises :class:`FanoutFullError` if the queue would exceed ``max_bytes``
        (a line larger than ``max_bytes`` is accepted into an empty queue, so
        that one big push is not refused forever).
        """
        if (topic == "") == (target is None):
            raise ValueError("a push has a topic or a target, not both")
        size = len(line)
        if self._jobs and self.queued_bytes + size > self.max_bytes:
            self._throttle.log("fanout_full", logging.WARNING,
                               "push queue full (%d bytes queued): refusing a push to %s",
                               self.queued_bytes, clip(topic or "one connection"))
            raise FanoutFullError(f"gateway push queue full ({self.queued_bytes} bytes queued)")
        self._jobs.append(_Job(line, topic, target))
        self.queued_bytes += size
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return once every push accepted so far has been written."""
        await self._idle.wait()

    async def run(self) -> None:
        """Write the queued pushes, in order, forever (the gateway runs it supervised)."""
        while True:
            if not self._jobs:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self._jobs[0]
            try:
                await self._write(job)
            finally:
                # Popped only now: accept() sees the running job's bytes as queued.
                self._jobs.popleft()
                self.queued_bytes -= len(job.line)

    async def _write(self, job: _Job) -> None:
        if job.target is not None:
            job.target.send(job.line)
            return
        # A snapshot at the job's start: connections that arrive during the
        # fan-out did not exist when the push was accepted.
        receivers = list(self._connections())
        for start in range(0, len(receivers), self.slice_size):
            if start:
                await asyncio.sleep(0)  # let the loop answer pings and requests between slices
            for conn in receivers[start:start + self.slice_size]:
                conn.push(job.topic, job.line)
