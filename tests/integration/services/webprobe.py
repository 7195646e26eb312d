"""``webprobe``: a backend for the HTTP and WebSocket gateway tests."""

from __future__ import annotations

import os
from typing import Any

import meshkit
from meshkit.gateway.bans import BanClientError
from meshkit.gateway.push import push_to_connection


class WebProbe(meshkit.Service):
    name = "webprobe"

    @meshkit.rpc(idempotent=True)
    async def whoami(self) -> dict[str, Any]:
        """What this call came with: connection, client address, trace id; and who answered."""
        ctx = meshkit.current_call()
        return {"connection": ctx.connection_id if ctx else None,
                "client": ctx.client_address if ctx else None,
                "trace_id": ctx.trace.trace_id if ctx else None,
                "pid": os.getpid()}

    @meshkit.rpc(idempotent=True)
    async def echo(self, value: Any) -> Any:
        return value

    @meshkit.rpc
    async def push_me(self, method: str, params: Any) -> bool:
        """Push ``method(params)`` to the connection this call came from."""
        ctx = meshkit.current_call()
        assert ctx is not None and ctx.connection_id is not None
        return await push_to_connection(self, ctx.connection_id, method, params)

    @meshkit.rpc
    async def announce(self, topic: str, payload: Any) -> int:
        """Publish ``payload`` on ``topic``; how many gateways it reached."""
        return await self.publish(topic, payload)

    @meshkit.rpc
    async def ban_me(self) -> None:
        raise BanClientError("flooding")
