"""``panel-front`` calls ``panel-back``, which records a user span: a two-hop trace for the panel's tests."""

from __future__ import annotations

import meshkit


class PanelFront(meshkit.Service):
    name = "panel-front"

    @meshkit.rpc
    async def order(self, customer: str) -> str:
        return str(await self.service("panel-back").ship(customer))


class PanelBack(meshkit.Service):
    name = "panel-back"

    @meshkit.rpc
    async def ship(self, customer: str) -> str:
        with self.span("sql", query="update stock set n = n - 1 where customer = ?", customer=customer):
            pass
        return f"shipped:{customer}"
