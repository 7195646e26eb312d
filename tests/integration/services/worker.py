"""``worker``: a configurable service for load, failure and lifecycle tests.

Environment (read per instance, so instances of one run can differ):

``WORKER_DELAY``
    seconds ``work()`` takes on this instance (default 0).
``WORKER_HOOKS_FILE``
    a file to which ``on_start``, every ``@periodic`` tick and ``on_stop``
    append a line (``start``, ``tick``, ``stop``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import meshkit


class Worker(meshkit.Service):
    name = "worker"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self.delay = float(os.environ.get("WORKER_DELAY", "0"))
        self.hooks_file = os.environ.get("WORKER_HOOKS_FILE", "")
        self.ticks = 0
        self._blocked = threading.Event()

    def _note(self, line: str) -> None:
        if self.hooks_file:
            with open(self.hooks_file, "a") as f:
                f.write(line + "\n")

    async def on_start(self) -> None:
        self._note("start")

    async def on_stop(self) -> None:
        self._note("stop")

    @meshkit.periodic(0.1)
    async def tick(self) -> None:
        self.ticks += 1
        self._note("tick")

    @meshkit.rpc(idempotent=True)
    async def tick_count(self) -> int:
        return self.ticks

    @meshkit.rpc
    async def work(self) -> str:
        """Take this instance's ``WORKER_DELAY``; return the instance id."""
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.instance_id

    @meshkit.rpc
    def block(self, seconds: float) -> str:
        """A plain handler that holds a pool thread for ``seconds``."""
        self._blocked.set()
        time.sleep(seconds)
        return self.instance_id

    @meshkit.rpc(idempotent=True)
    def is_blocked(self) -> bool:
        """Whether a ``block`` call has started (a plain handler, like ``block``)."""
        return self._blocked.is_set()

    @meshkit.rpc(idempotent=True)
    async def ping(self) -> str:
        return "pong"

    @meshkit.rpc
    async def fail(self, message: str) -> None:
        """Raise ``ValueError(message)`` from a nested function (for tracebacks)."""
        _raise_value_error(message)


def _raise_value_error(message: str) -> None:
    raise ValueError(message)
