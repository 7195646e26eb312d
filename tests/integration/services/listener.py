"""``listener``: a second subscriber of ``echo.events`` that says who it is."""

from __future__ import annotations

from typing import Any

import meshkit


class Listener(meshkit.Service):
    name = "listener"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self._events: list[Any] = []

    @meshkit.subscribe("echo.events")
    async def on_event(self, payload: Any) -> None:
        self._events.append(payload)

    @meshkit.rpc(idempotent=True)
    async def events(self) -> dict[str, Any]:
        """This instance's id and every payload it received, in arrival order."""
        return {"instance": self.instance_id, "events": list(self._events)}
