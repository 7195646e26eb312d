"""``vault`` holds values; ``teller`` may call it and hands out capability tokens for one of its methods."""

from __future__ import annotations

from typing import Any

import meshkit
from meshkit import access, curve


class Vault(meshkit.Service):
    name = "vault"

    @meshkit.rpc
    async def read(self, key: str) -> str:
        return f"value of {key}"

    @meshkit.rpc
    async def wipe(self) -> str:
        return "wiped"


class Teller(meshkit.Service):
    name = "teller"

    @meshkit.rpc
    async def relay(self, method: str, *args: Any) -> Any:
        return await self.call("vault", method, args)

    @meshkit.rpc
    async def grant(self, grantee: str, method: str, ttl: float) -> str:
        """A token letting ``grantee`` call ``vault.<method>`` for ``ttl`` seconds, signed by this service's key."""
        return access.issue(curve.load_keypair(self.settings), grantee, "vault", method, ttl)
