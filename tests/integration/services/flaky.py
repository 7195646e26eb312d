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
