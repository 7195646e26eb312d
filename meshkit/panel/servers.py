"""HAProxy's servers as the panel shows them, read from its runtime API.

:func:`server_rows` is the pure part: every server of every backend from
``show servers state`` (:func:`meshkit.haproxy.runtime.parse_servers_state`)
as a row with one word for its state — ``up``, ``down``, ``drain`` or
``maint`` — the words HAProxy's own stats page uses. :class:`ServersView`
asks the runtime API socket of the stack's HAProxy (``haproxy.sock`` in the
run directory; :class:`meshkit.haproxy.render.RuntimePaths`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..haproxy.errors import HAProxyError
from ..haproxy.render import RuntimePaths
from ..haproxy.runtime import RuntimeAPI, ServerState
from ..untrusted import clip

MAX_SERVERS = 1000  # rows sent to the page


def state_word(server: ServerState) -> str:
    if server.in_maintenance:
        return "maint"
    if server.draining:
        return "drain"
    return "up" if server.up else "down"


def server_rows(servers: Iterable[ServerState]) -> list[dict[str, Any]]:
    """One row per server, sorted by backend then name."""
    rows = [{"backend": s.backend, "name": s.name, "address": f"{s.host}:{s.port}", "state": state_word(s),
             "checked": s.health_enabled} for s in servers]
    rows.sort(key=lambda r: (r["backend"], r["name"]))
    return rows[:MAX_SERVERS]


class ServersView:
    """Reads the servers of the HAProxy whose runtime API socket is ``socket_path``."""

    def __init__(self, socket_path: str | Path, timeout: float = 2.0) -> None:
        self.api = RuntimeAPI(socket_path, timeout)

    @classmethod
    def in_run_dir(cls, run_dir: str) -> ServersView:
        return cls(RuntimePaths.in_dir(run_dir).stats_socket)

    async def read(self) -> dict[str, Any]:
        """``{"servers": [...]}``, or ``{"error": why}`` when HAProxy does not answer."""
        if not self.api.path.exists():
            return {"error": f"no HAProxy runtime socket at {clip(str(self.api.path))}"}
        try:
            return {"servers": server_rows(await self.api.servers())}
        except (HAProxyError, OSError) as exc:
            return {"error": clip(str(exc))}
