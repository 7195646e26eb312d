"""The bundled example: ``echo`` returns what it is given and records pushed events."""

from __future__ import annotations

import asyncio
from typing import Any

import meshkit


class Echo(meshkit.Service):
    """``echo(value)`` returns ``value``; pushes to ``echo.events`` are kept (see ``events()``)."""

    name = "echo"
    version = "1"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self._events: list[Any] = []

    @meshkit.rpc(idempotent=True)
    async def echo(self, value: Any) -> Any:
        return value

    @meshkit.rpc(idempotent=True)
    async def events(self) -> list[Any]:
        """Every payload pushed to ``echo.events`` so far, in arrival order."""
        return list(self._events)

    @meshkit.rpc
    async def sleep(self, seconds: float) -> str:
        """Wait ``seconds`` and return this instance's id (for load and drain tests)."""
        await asyncio.sleep(seconds)
        return self.instance_id

    @meshkit.rpc
    def whoami(self) -> str:
        """A plain handler (runs in the thread pool): this instance's id."""
        return self.instance_id

    @meshkit.subscribe("echo.events")
    async def on_event(self, payload: Any) -> None:
        self._events.append(payload)
