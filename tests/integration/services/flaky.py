"""``flaky``: a service whose instances started with ``FLAKY_FAIL=1`` raise on every call."""

from __future__ import annotations

import os

import meshkit


class Flaky(meshkit.Service):
    name = "flaky"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self.failing = os.environ.get("FLAKY_FAIL") == "1"

    @meshkit.rpc
    async def work(self) -> str:
        """Return the instance id, or raise on a failing instance (a ``handler_error``)."""
        if self.failing:
            raise RuntimeError("this instance fails every call")
        return self.instance_id

    @meshkit.rpc
    async def call_work(self, n: int) -> int:
        """Call ``flaky.work`` ``n`` times through this instance's own client; return how many failed."""
        failed = 0
        for _ in range(n):
            try:
                await self.client.call("flaky", "work")
            except meshkit.HandlerError:
                failed += 1
        return failed
