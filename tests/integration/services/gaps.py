"""``gapprobe``: a subscriber that records each push's stream number and gap, and handles slowly."""

from __future__ import annotations

import asyncio
from typing import Any

import meshkit


class GapProbe(meshkit.Service):
    name = "gapprobe"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self._seen: list[list[Any]] = []

    @meshkit.subscribe("gap.test")
    async def on_push(self, payload: Any) -> None:
        call = meshkit.current_call()
        assert call is not None
        self._seen.append([payload, call.push_seq, call.gap, "_seq" in call.meta])
        await asyncio.sleep(0.02)  # slow enough that a burst overflows a short queue

    @meshkit.rpc
    def seen(self) -> list[list[Any]]:
        """``[payload, push_seq, gap, seq key visible]`` of every push handled, in order."""
        return self._seen
