"""``limited``: a service whose methods are limited, for the call-limit and resource tests.

Its resources need a ``[resources.payments_api]`` table in the file named by
``MESHKIT_CONFIG``. Every resource-using method answers
``[start, end, instance_id]`` (wall-clock times taken inside the limit), and
``pay`` also the Redis rate window its token came from, so a test can check
from the answers alone how many calls held the resource at once, how many
spent each window's tokens, and how many started in any one second.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import meshkit


class Limited(meshkit.Service):
    name = "limited"

    @meshkit.rpc(max_concurrency=2, max_queued=2)
    async def hold(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return self.instance_id

    @meshkit.rpc(uses={"payments_api": 1})
    async def pay(self, seconds: float = 0.0) -> list[Any]:
        start = time.time()
        window = self._rate_window()  # the Redis window of this call's token: nothing ran since it was taken
        await asyncio.sleep(seconds)
        return [start, time.time(), self.instance_id, window]

    def _rate_window(self) -> int | None:
        pool = self._server.limits.resources if self._server is not None else None
        rate = pool.resources["payments_api"].rate if pool is not None else None
        return rate.index if rate is not None else None

    @meshkit.rpc(uses={"payments_api": 1}, wait_for_resources=False)
    async def pay_now(self, seconds: float = 0.0) -> list[Any]:
        start = time.time()
        await asyncio.sleep(seconds)
        return [start, time.time(), self.instance_id]

    @meshkit.rpc
    async def typed(self, n: int, s: str) -> str:
        return s * n

    @meshkit.rpc
    async def resource_use(self) -> dict[str, Any]:
        """This instance's id, and the Redis round trips and units it spent, per resource."""
        pool = self._server.limits.resources if self._server is not None else None
        use = {} if pool is None else {
            name: {"used": r.use.used, "leases": r.use.leases, "errors": r.use.errors, "exhausted": r.use.exhausted}
            for name, r in pool.resources.items()}
        return {"instance": self.instance_id, "use": use}
