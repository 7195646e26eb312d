"""HAProxy (through ``meshkit haproxy sync``) with a tcp and an http frontend, for the web gateway tests."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

from haproxykit import REPO, Sync

from meshkit import Settings
from meshkit.haproxy.runtime import RuntimeAPI, ServerState
from meshkit.programs import find_program
from meshkit.testing.processes import tcp_listener

WEB_BACKEND = "gateway.web"


class WebSync(Sync):
    """Sync with the shipped checks: ``mesh.ping`` on tcp, ``GET /health`` on http; PROXY v2 on both."""

    def __init__(self, settings: Settings, directory: Path, public: socket.socket,
                 retry_on: str = "conn-failure empty-response response-timeout 503") -> None:
        self.web_public = tcp_listener()
        self.web_port = self.web_public.getsockname()[1]
        self.retry_on = retry_on
        super().__init__(settings, directory, public)

    def write_config(self, extra: str = "") -> None:
        self.toml.write_text(f"""
[haproxy]
templates = "{REPO / 'haproxy'}"
hard_stop_after = "5s"
stop_timeout = 5.0
reconcile_interval = 0.5
send_proxy = "v2"

[haproxy.timeouts]
tunnel = "1h"
http_keep_alive = "10s"
http_request = "1s"

[haproxy.check]
inter = "300ms"
fastinter = "100ms"
tcp_check = "jsonrpc"

[haproxy.retries]
count = 3
http_retry_on = "{self.retry_on}"

[[frontend]]
name = "stratum"
bind = "127.0.0.1:1"
service = "gateway"
listener = "stratum"

[[frontend]]
name = "web"
bind = "127.0.0.1:1"
mode = "http"
service = "gateway"
listener = "web"
balance = "roundrobin"
http_check = "GET /health"
""")

    def meshkit_haproxy(self, action: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "meshkit", "haproxy", action, "--config", str(self.toml),
                "--run-dir", str(self.paths.config_file.parent),
                "--bind", f"stratum=fd@{self.public.fileno()}",
                "--bind", f"web=fd@{self.web_public.fileno()}",
                "--haproxy", find_program("haproxy"), *args]

    def start(self, *args: str) -> Sync:
        import os
        import subprocess

        from meshkit.testing import settings_env, wait_until

        env = {**os.environ, **settings_env(self.settings), "MESHKIT_LOG_FORMAT": "text"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.meshkit_haproxy("sync", *args), env=env,
                pass_fds=(self.public.fileno(), self.web_public.fileno()),
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_until(lambda: self.alive() and self.master_pid() and self.web_servers() is not None,
                   10.0, "the sync process and haproxy to answer")
        return self

    def web_servers(self) -> dict[str, ServerState]:
        states = asyncio.run(RuntimeAPI(self.paths.stats_socket).servers())
        return {s.name: s for s in states if s.backend == WEB_BACKEND}

    def web_up(self) -> int:
        return sum(1 for s in self.web_servers().values() if s.up)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def close(self) -> None:
        self.web_public.close()


def rpc(method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
    if params is not None:
        doc["params"] = params
    return doc


def dumps(doc: Any) -> str:
    return json.dumps(doc)
