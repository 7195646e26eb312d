"""HAProxy's servers as the panel shows them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshkit.haproxy.runtime import ADMIN_FORCED_DRAIN, ADMIN_FORCED_MAINT, OP_RUNNING, OP_STOPPED, ServerState
from meshkit.panel.servers import ServersView, server_rows


def server(name: str, op: int = OP_RUNNING, admin: int = 0, backend: str = "gateway.stratum") -> ServerState:
    return ServerState(backend, name, "127.0.0.1", 4000, op, admin, 6)


def test_each_server_gets_one_state_word() -> None:
    rows = server_rows([server("d", admin=ADMIN_FORCED_DRAIN), server("a"), server("c", admin=ADMIN_FORCED_MAINT),
                        server("b", op=OP_STOPPED)])
    assert [(r["name"], r["state"]) for r in rows] == [("a", "up"), ("b", "down"), ("c", "maint"), ("d", "drain")]
    assert rows[0] == {"backend": "gateway.stratum", "name": "a", "address": "127.0.0.1:4000", "state": "up",
                       "checked": True}


def test_a_missing_haproxy_is_shown_not_raised(tmp_path: Path) -> None:
    answer = asyncio.run(ServersView.in_run_dir(str(tmp_path)).read())
    assert "no HAProxy runtime socket" in answer["error"]
