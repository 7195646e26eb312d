"""``edgeprobe``: a backend for the gateway edge tests: what it sees of a client, faults, bad answers."""

from __future__ import annotations

import asyncio
from typing import Any

import meshkit
from meshkit.gateway.bans import BanClientError, ClientFaultError


class EdgeProbe(meshkit.Service):
    name = "edgeprobe"

    @meshkit.rpc
    async def whoami(self) -> dict[str, Any]:
        """The connection id and the client's address this call came with."""
        ctx = meshkit.current_call()
        return {"connection": ctx.connection_id if ctx else None,
                "client": ctx.client_address if ctx else None}

    @meshkit.rpc
    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @meshkit.rpc
    async def fault(self) -> None:
        raise ClientFaultError("invalid share")

    @meshkit.rpc
    async def ban_me(self) -> None:
        raise BanClientError("flooding with duplicate shares")


class BadBackend(meshkit.Service):
    """Fails every call one way or another."""

    name = "badbackend"

    @meshkit.rpc
    async def fail(self) -> None:
        raise RuntimeError("this backend fails every call")

    @meshkit.rpc
    async def nan(self) -> float:
        return float("nan")  # JSON cannot carry it

    @meshkit.rpc
    async def huge(self) -> dict[str, Any]:
        return {"deep": [float("inf")] * 1000}
