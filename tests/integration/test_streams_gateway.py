"""A streamed call through HAProxy and the gateway: ``mesh.stream`` notifications, then the answer.

Real processes: Redis, the streaming service, a gateway, and HAProxy (run by
``meshkit haproxy sync``) in front of it, as in production.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from haproxykit import REPO, Sync, kill_haproxy
from lineclient import LineClient, line_clients

from meshkit import Settings
from meshkit.testing import ServiceProcess, wait_until
from meshkit.testing.processes import tcp_listener

pytestmark = pytest.mark.integration

StartService = Callable[..., list[ServiceProcess]]
STREAMER = "tests.integration.services.streamer:Streamer"
WAIT = 10.0


class _JsonrpcSync(Sync):
    """``meshkit haproxy sync`` with the shipped health check (mesh.ping)."""

    def write_config(self, extra: str = "") -> None:
        self.toml.write_text(f"""
[haproxy]
templates = "{REPO / 'haproxy'}"
hard_stop_after = "5s"
stop_timeout = 5.0
reconcile_interval = 0.5

[haproxy.check]
inter = "300ms"
fastinter = "100ms"
tcp_check = "jsonrpc"

[[frontend]]
name = "stratum"
bind = "127.0.0.1:1"
service = "gateway"
listener = "stratum"
""")


@pytest.fixture
def haproxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[_JsonrpcSync]:
    public = tcp_listener()
    runner = _JsonrpcSync(mesh_settings, tmp_path, public)
    yield runner
    runner.stop()
    kill_haproxy(runner.paths)
    public.close()


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


def test_a_jsonrpc_client_gets_the_items_as_notifications_then_the_answer(
    start_service: StartService, haproxy: _JsonrpcSync, clients: Callable[[str], LineClient], tmp_path: Path
) -> None:
    start_service(STREAMER, env={"STREAM_LOG": str(tmp_path / "stream.log")})
    start_service("meshkit.gateway:Gateway", env={"MESHKIT_GATEWAY_LIMIT_EXEMPT": "",
                                                  "MESHKIT_GATEWAY_REQUEST_TIMEOUT": "10"})
    haproxy.start()
    wait_until(lambda: any(s.up for s in haproxy.servers().values()), WAIT, "the gateway to be up in HAProxy")
    client = clients(f"127.0.0.1:{haproxy.port}")
    rid = client.request("streamer.count", ["gw", 30])
    notes = []
    deadline = time.monotonic() + WAIT
    while True:
        doc = client.recv(max(0.01, deadline - time.monotonic()))
        if "method" not in doc:
            break
        notes.append(doc)
    assert doc == {"jsonrpc": "2.0", "id": rid, "result": None}  # the final answer comes last
    assert all(n["method"] == "mesh.stream" and n["params"]["id"] == rid for n in notes)
    assert [n["params"]["item"] for n in notes] == list(range(30))
    # The connection goes on serving: a second stream, by keyword, and an error for a bad argument.
    rid = client.request("streamer.count", {"tag": "gw2", "n": 3})
    items = [client.recv()["params"]["item"] for _ in range(3)]
    assert items == [0, 1, 2] and client.answer(rid)["result"] is None
    bad = client.call("streamer.count", ["gw3", "three"])
    assert "error" in bad
