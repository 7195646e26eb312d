"""``pushprobe``: a backend that pushes to single connections and to a topic, for the push tests."""

from __future__ import annotations

import asyncio
from typing import Any

import meshkit
from meshkit.gateway import push_to_connection


class PushProbe(meshkit.Service):
    name = "pushprobe"

    @meshkit.rpc
    async def me(self, method: str, params: Any = None) -> bool:
        """Push ``method(params)`` to the calling connection, before this call answers."""
        ctx = meshkit.current_call()
        assert ctx is not None and ctx.connection_id is not None
        return await push_to_connection(self, ctx.connection_id, method, params)

    @meshkit.rpc
    async def to(self, conn: str, method: str, params: Any = None) -> bool:
        """Push to any connection by id; False if it is not open."""
        return await push_to_connection(self, conn, method, params)

    @meshkit.rpc
    async def interleave(self, conn: str, topic: str, count: int) -> list[bool]:
        """``count`` pushes alternating between ``topic`` (all gateways) and ``conn`` alone, all in flight at once.

        Sent without waiting for one another: only the transport keeps them in order.
        """
        sends = [self.publish(topic, {"seq": i}) if i % 2 else
                 push_to_connection(self, conn, "probe.seq", {"seq": i}) for i in range(count)]
        return [bool(x) for x in await asyncio.gather(*sends)]
