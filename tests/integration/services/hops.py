"""``hop-a`` calls ``hop-b``; each logs one line per call (for following a request by trace id)."""

from __future__ import annotations

import meshkit


class HopA(meshkit.Service):
    name = "hop-a"

    @meshkit.rpc
    async def begin(self, order: str) -> str:
        self.log.info("order received", extra={"order": order})
        return str(await self.service("hop-b").finish(order))


class HopB(meshkit.Service):
    name = "hop-b"

    @meshkit.rpc
    async def finish(self, order: str) -> str:
        self.log.info("order finished", extra={"order": order})
        return f"done:{order}"
