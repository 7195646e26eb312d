"""``gwprobe``: a backend for the gateway tests; shows what a backend sees of a client."""

from __future__ import annotations

import asyncio
from typing import Any

import meshkit
from meshkit.gateway import ConnectionStore


class GatewayProbe(meshkit.Service):
    name = "gwprobe"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self.connections = ConnectionStore(self.settings)

    async def on_stop(self) -> None:
        await self.connections.aclose()

    @meshkit.rpc
    async def whoami(self) -> dict[str, Any]:
        """The gateway connection id this call came from, and this instance's id."""
        ctx = meshkit.current_call()
        return {"connection": ctx.connection_id if ctx else None, "instance": self.instance_id}

    @meshkit.rpc
    async def echo(self, value: Any = None, **named: Any) -> Any:
        return {"value": value, "named": named} if named else value

    @meshkit.rpc
    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @meshkit.rpc
    async def fail(self, message: str) -> None:
        raise LookupError(message)

    @meshkit.rpc
    async def remember(self, field: str, value: str) -> dict[str, str]:
        """Store a field in this connection's state; return all its fields."""
        state = self.connections.current()
        await state.set(field, value)
        await state.incr("calls")
        return await state.all()
