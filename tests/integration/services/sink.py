"""``sink``: a subscriber and a server whose handlers wait at a gate, keeping nothing.

Lets attack tests fill an instance's queues on purpose: pushes to ``jobs.*``
and calls to ``wait`` block until ``release()``; payloads are dropped at once,
so whatever memory the instance holds is what meshkit holds for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import meshkit


class Sink(meshkit.Service):
    name = "sink"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self._gate = asyncio.Event()
        self._handled = 0

    @meshkit.subscribe("jobs.*")
    async def on_job(self, payload: Any) -> None:
        del payload
        await self._gate.wait()
        self._handled += 1

    @meshkit.rpc
    async def wait(self, *args: Any) -> str:
        await self._gate.wait()
        return "done"

    @meshkit.rpc
    async def ping(self) -> str:
        return "pong"

    @meshkit.rpc
    async def release(self) -> int:
        """Open the gate: everything waiting runs. Returns pushes handled so far."""
        self._gate.set()
        return self._handled

    @meshkit.rpc
    async def handled(self) -> int:
        return self._handled
