"""The gateway's edge against real processes: client addresses through HAProxy (PROXY v2),
per-address limits, bans shared through Redis, reconnect waves at stop, backends gone or bad."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from haproxykit import REPO, Sync
from lineclient import LineClient, error_code, line_clients

from meshkit import Settings
from meshkit.gateway import jsonrpc
from meshkit.testing import RedisServer, ServiceProcess, settings_env, test_settings, wait_until
from meshkit.testing.processes import tcp_listener

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
PROBE = "tests.integration.services.edgeprobe:EdgeProbe"
BAD = "tests.integration.services.edgeprobe:BadBackend"
GWPROBE = "tests.integration.services.gwprobe:GatewayProbe"
WAIT = 10.0

StartService = Callable[..., list[ServiceProcess]]
Clients = Callable[[str], LineClient]


@pytest.fixture
def clients() -> Iterator[Clients]:
    yield from line_clients()


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def counted(sock: socket.socket, name: str, timeout: float = WAIT) -> int:
    """The sum of statsd counter ``name`` received until it is non-zero (or ``timeout``)."""
    total = 0
    deadline = time.monotonic() + timeout
    while not total and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        for line in data.decode().splitlines():
            metric, _, value = line.partition(":")
            if metric == name:
                total += int(value.split("|")[0])
    return total


def gateway_env(**options: Any) -> dict[str, str]:
    # Every client of these tests comes from 127.0.0.1: nothing is exempt.
    env = {"MESHKIT_GATEWAY_LIMIT_EXEMPT": ""}
    env.update({f"MESHKIT_GATEWAY_{k.upper()}": str(v) for k, v in options.items()})
    return env


def start_gateway(start_service: StartService, settings: Settings | None = None,
                  **options: Any) -> tuple[ServiceProcess, str]:
    [gw] = start_service(GATEWAY, env=gateway_env(**options), settings=settings)
    assert gw.record is not None
    return gw, gw.record.listeners["stratum"]


def proxy_v1(source: str, port: int = 40000) -> bytes:
    """A PROXY v1 header saying the connection comes from ``source:port``."""
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {port} 3333\r\n".encode()


def from_address(clients: Clients, address: str, source: str, port: int = 40000) -> LineClient:
    """A client the gateway takes for ``source`` (its first bytes are a PROXY v1 header)."""
    client = clients(address)
    client.send(proxy_v1(source, port))
    return client


class JsonrpcSync(Sync):
    """``meshkit haproxy sync`` with the shipped health check (mesh.ping) and PROXY v2 headers."""

    def write_config(self, extra: str = "") -> None:
        self.toml.write_text(f"""
[haproxy]
templates = "{REPO / 'haproxy'}"
hard_stop_after = "5s"
stop_timeout = 5.0
reconcile_interval = 0.5
send_proxy = "v2"

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
def haproxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[JsonrpcSync]:
    from haproxykit import kill_haproxy

    public = tcp_listener()
    runner = JsonrpcSync(mesh_settings, tmp_path, public)
    yield runner
    runner.stop()
    kill_haproxy(runner.paths)
    public.close()


# -- PROXY protocol ----------------------------------------------------------------------


def test_the_gateway_sees_the_real_client_address_through_haproxy(
    start_service: StartService, clients: Clients, haproxy: JsonrpcSync
) -> None:
    start_service(PROBE)
    gw, _ = start_gateway(start_service, proxy_protocol="require")
    haproxy.start()
    # Up means HAProxy's mesh.ping checks pass: they carry a PROXY header too (check-send-proxy).
    wait_until(lambda: any(s.up for s in haproxy.servers().values()), WAIT, "the gateway to be up in HAProxy")
    client = clients(f"127.0.0.1:{haproxy.port}")
    own = client.sock.getsockname()
    seen = client.call("edgeprobe.whoami")["result"]
    assert seen["client"] == f"{own[0]}:{own[1]}"  # the client's own port, not HAProxy's
    assert seen["connection"].startswith(gw.record.instance_id if gw.record else "?")


def test_a_connection_without_a_valid_header_is_closed_and_counted(
    start_service: StartService, clients: Clients, statsd: socket.socket
) -> None:
    port = statsd.getsockname()[1]
    [gw] = start_service(GATEWAY, env={**gateway_env(proxy_protocol="require", proxy_timeout=1.0),
                                       "MESHKIT_STATSD_ADDRESS": f"127.0.0.1:{port}",
                                       "MESHKIT_STATSD_PREFIX": "t"})
    assert gw.record is not None
    address = gw.record.listeners["stratum"]
    plain = clients(address)
    plain.send(b'{"jsonrpc":"2.0","method":"mesh.ping","id":1}\n')
    assert plain.closed(5.0)
    bad = clients(address)
    bad.send(b"PROXY TCP4 300.1.2.3 127.0.0.1 1 2\r\n")
    assert bad.closed(5.0)
    silent = clients(address)  # sends nothing: closed after proxy_timeout
    started = time.monotonic()
    assert silent.closed(5.0)
    assert 0.8 < time.monotonic() - started < 4.0
    assert counted(statsd, "t.gateway.gateway.rejected.proxy_header") >= 1
    good = from_address(clients, address, "203.0.113.9")  # a valid header is served
    assert good.call("mesh.ping")["result"] == "pong"


def test_v2_header_from_a_client_is_read_and_accept_mode_takes_plain_clients(
    start_service: StartService, clients: Clients
) -> None:
    start_service(PROBE)
    _, address = start_gateway(start_service)  # proxy_protocol = "accept", the default
    plain = clients(address)
    own = plain.sock.getsockname()
    assert plain.call("edgeprobe.whoami")["result"]["client"] == f"{own[0]}:{own[1]}"
    v2 = clients(address)
    src = socket.inet_aton("198.51.100.7") + socket.inet_aton("127.0.0.1")
    v2.send(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + src + (5555).to_bytes(2, "big") + (3333).to_bytes(2, "big")
            + b'{"jsonrpc":"2.0","method":"edgeprobe.whoami","id":1}\n')  # client bytes right after it
    assert v2.answer(1)["result"]["client"] == "198.51.100.7:5555"


# -- limits ------------------------------------------------------------------------------


def test_connections_per_address_are_limited(start_service: StartService, clients: Clients) -> None:
    _, address = start_gateway(start_service, max_per_address=2)
    first, second = (from_address(clients, address, "192.0.2.1", p) for p in (1, 2))
    for client in (first, second):
        assert client.call("mesh.ping")["result"] == "pong"
    third = from_address(clients, address, "192.0.2.1", 3)
    refused = third.recv()
    assert error_code(refused) == jsonrpc.ADDRESS_LIMITED and refused["id"] is None
    assert refused["error"]["data"]["reason"] == "too_many_from_address"
    assert third.closed()
    other = from_address(clients, address, "192.0.2.2")  # another address is not affected
    assert other.call("mesh.ping")["result"] == "pong"
    first.close()
    wait_until(lambda: _pings(from_address(clients, address, "192.0.2.1", 4)), WAIT,
               "a place to free up once a connection closed")


def _pings(client: LineClient) -> bool:
    doc = client.call("mesh.ping")
    return doc.get("result") == "pong"


def test_connection_rate_per_address_is_limited(start_service: StartService, clients: Clients) -> None:
    _, address = start_gateway(start_service, connect_rate=0.5, connect_burst=3)
    for port in (1, 2, 3):
        assert from_address(clients, address, "192.0.2.5", port).call("mesh.ping")["result"] == "pong"
    fourth = from_address(clients, address, "192.0.2.5", 4)
    refused = fourth.recv()
    assert error_code(refused) == jsonrpc.ADDRESS_LIMITED
    assert refused["error"]["data"]["reason"] == "connect_rate"
    assert from_address(clients, address, "192.0.2.6").call("mesh.ping")["result"] == "pong"


def test_request_rate_per_connection_is_limited(start_service: StartService, clients: Clients) -> None:
    _, address = start_gateway(start_service, request_rate=2, request_burst=5)
    client = from_address(clients, address, "192.0.2.8")
    client.send(b"".join(b'{"jsonrpc":"2.0","method":"mesh.ping","id":%d}\n' % i for i in range(20)))
    answers = [client.answer(i) for i in range(20)]
    ok = [a for a in answers if a.get("result") == "pong"]
    limited = [a for a in answers if "error" in a]
    assert 5 <= len(ok) <= 7, answers  # the burst, plus what the rate refilled meanwhile
    assert {error_code(a) for a in limited} == {jsonrpc.RATE_LIMITED}
    wait_until(lambda: client.call("mesh.ping").get("result") == "pong", WAIT,
               "the connection's rate to refill")


# -- bans --------------------------------------------------------------------------------


def meshkit_ban(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshkit", "ban", *args],
                          env=dict(os.environ, **settings_env(settings)), capture_output=True, text=True,
                          cwd=REPO, timeout=30)


def banned(clients: Clients, address: str, source: str) -> bool:
    """Whether the gateway at ``address`` closes a client from ``source`` with ``banned``."""
    client = from_address(clients, address, source)
    client.send(b'{"jsonrpc":"2.0","method":"mesh.ping","id":1}\n')
    doc = client.recv()
    client.close()
    return doc.get("error", {}).get("code") == jsonrpc.BANNED


def test_a_ban_for_invalid_requests_is_shared_and_holds_without_redis(
    start_service: StartService, clients: Clients, tmp_path: Path
) -> None:
    redis = RedisServer(str(tmp_path)).start()
    try:
        settings = test_settings(redis.url)
        options = {"ban_min_requests": 10, "ban_ratio": 0.5, "ban_time": 300}
        _, first = start_gateway(start_service, settings, **options)
        _, second = start_gateway(start_service, settings, **options)
        attacker = from_address(clients, first, "198.51.100.66")
        assert attacker.call("mesh.ping")["result"] == "pong"  # a valid built-in does not count
        attacker.send(b"not json\n" * 10)
        docs = [attacker.recv() for _ in range(10)]
        # The 10th bad line is the one that bans: it is answered by the ban itself.
        assert [error_code(d) for d in docs[:9]] == [jsonrpc.PARSE_ERROR] * 9
        assert error_code(docs[9]) == jsonrpc.BANNED and docs[9]["id"] is None
        assert "until" in docs[9]["error"]["data"]
        assert attacker.closed()
        banned_at = time.monotonic()
        wait_until(lambda: banned(clients, second, "198.51.100.66"), WAIT, "the ban to reach the other gateway")
        assert time.monotonic() - banned_at < 1.5
        assert not banned(clients, second, "198.51.100.67")
        redis.stop()  # bans are checked from memory: the ban holds, connects still work
        assert banned(clients, first, "198.51.100.66") and banned(clients, second, "198.51.100.66")
        for address in (first, second):
            assert from_address(clients, address, "198.51.100.68").call("mesh.ping")["result"] == "pong"
    finally:
        redis.stop()


def test_meshkit_ban_add_ls_rm(start_service: StartService, clients: Clients, mesh_settings: Settings) -> None:
    _, address = start_gateway(start_service)
    added = meshkit_ban(mesh_settings, "add", "203.0.113.50", "--seconds", "120", "--reason", "manual test")
    assert added.returncode == 0, added.stderr
    wait_until(lambda: banned(clients, address, "203.0.113.50"), WAIT, "the gateway to learn of the ban")
    listed = meshkit_ban(mesh_settings, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    [ban] = json.loads(listed.stdout)
    assert ban["address"] == "203.0.113.50" and ban["reason"] == "manual test"
    assert 100 < ban["until"] - time.time() <= 120
    table = meshkit_ban(mesh_settings, "ls")
    assert "203.0.113.50" in table.stdout and "manual test" in table.stdout
    bad = meshkit_ban(mesh_settings, "add", "not-an-ip")
    assert bad.returncode == 2 and "not-an-ip" in bad.stderr
    removed = meshkit_ban(mesh_settings, "rm", "203.0.113.50")
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: not banned(clients, address, "203.0.113.50"), WAIT, "the gateway to lift the ban")
    assert json.loads(meshkit_ban(mesh_settings, "ls", "--json").stdout) == []
    assert meshkit_ban(mesh_settings, "rm", "203.0.113.50").returncode == 1  # no such ban


def test_backends_mark_client_faults_and_ask_for_bans(start_service: StartService, clients: Clients) -> None:
    start_service(PROBE)
    _, address = start_gateway(start_service, ban_min_requests=4, ban_ratio=0.75)
    miner = from_address(clients, address, "192.0.2.30")
    assert miner.call("edgeprobe.whoami")["result"]["client"] == "192.0.2.30:40000"
    faults = [miner.call("edgeprobe.fault") for _ in range(2)]
    # The fault travels as its code, and the client gets the backend's message as it is.
    assert {f["error"]["data"]["code"] for f in faults} == {"client_fault"}
    assert {f["error"]["message"] for f in faults} == {"invalid share"}
    miner.request("edgeprobe.fault")  # 3 bad of 4: this one bans (and is answered by the ban)
    assert error_code(miner.recv()) == jsonrpc.BANNED
    honest = from_address(clients, address, "192.0.2.31")
    for _ in range(4):
        assert "result" in honest.call("edgeprobe.whoami")  # good requests never ban
    asker = from_address(clients, address, "192.0.2.32")
    asker.request("edgeprobe.ban_me")
    closing = asker.recv()  # the ban answers it
    assert error_code(closing) == jsonrpc.BANNED and "duplicate shares" in closing["error"]["message"]
    assert banned(clients, address, "192.0.2.32") and not banned(clients, address, "192.0.2.31")


# -- stopping: reconnect waves --------------------------------------------------------------


class Mover(threading.Thread):
    """A client that honours ``mesh.reconnect``: it stops sending, collects its answers, and leaves."""

    def __init__(self, address: str, source: str) -> None:
        super().__init__(daemon=True)
        self.client = LineClient(address)
        self.client.send(proxy_v1(source))
        self.told_at: float | None = None
        self.params: Any = None
        self.sent = 0
        self.answered = 0
        self.errors: list[dict[str, Any]] = []

    def run(self) -> None:
        pending: set[int] = set()
        while self.told_at is None:
            pending.add(self.client.request("edgeprobe.sleep", [0.05]))
            self.sent += 1
            doc = self.client.recv(WAIT)
            self._take(doc, pending)
        while pending:  # every request sent before the notice is still answered
            self._take(self.client.recv(WAIT), pending)
        self.client.close()

    def _take(self, doc: dict[str, Any], pending: set[int]) -> None:
        if doc.get("method") == "mesh.reconnect":
            self.told_at = time.monotonic()
            self.params = doc["params"]
        elif "error" in doc:
            self.errors.append(doc)
            pending.discard(doc.get("id"))  # type: ignore[arg-type]
        else:
            self.answered += 1
            pending.discard(doc["id"])


def test_a_stopping_gateway_asks_its_clients_to_move_in_waves(start_service: StartService) -> None:
    start_service(PROBE)
    gw, address = start_gateway(start_service, reconnect_window=2.0, drain_grace=6.0,
                                reconnect_address="pool.example.com:3333")
    movers = [Mover(address, f"192.0.2.{100 + i}") for i in range(24)]
    for mover in movers:
        mover.start()
    wait_until(lambda: all(m.answered for m in movers), WAIT, "every client to be served")
    stopped_at = time.monotonic()
    assert gw.process is not None
    gw.process.send_signal(signal.SIGTERM)
    for mover in movers:
        mover.join(WAIT)
    assert gw.process.wait(WAIT) == 0
    told = sorted(m.told_at - stopped_at for m in movers if m.told_at is not None)
    assert len(told) == 24, "every client was told"
    assert {json.dumps(m.params) for m in movers} == {'{"host": "pool.example.com", "port": 3333, "wait": 0}'}
    assert told[-1] - told[0] >= 1.2, told  # spread over the 2 s window, not all at once
    per_quarter = [sum(1 for t in told if k * 0.25 <= t - told[0] < (k + 1) * 0.25) for k in range(12)]
    assert max(per_quarter) <= 8, per_quarter  # 24 over 8 waves: 3 each, with slack for a noisy machine
    assert all(not m.errors for m in movers), [m.errors for m in movers if m.errors]
    assert sum(m.answered for m in movers) == sum(m.sent for m in movers)  # nothing lost mid-flight


# -- backends gone or bad ----------------------------------------------------------------------


def test_clients_are_told_when_a_backend_is_gone_and_closed_if_configured(
    start_service: StartService, clients: Clients
) -> None:
    [probe] = start_service(PROBE)
    _, address = start_gateway(start_service, gone_after=1.0, gone_disconnect="true")
    user = from_address(clients, address, "192.0.2.40")
    bystander = from_address(clients, address, "192.0.2.41")
    assert "result" in user.call("edgeprobe.whoami")
    assert bystander.call("mesh.ping")["result"] == "pong"
    gone_at = time.monotonic()
    probe.terminate()
    notice = user.push(WAIT)
    assert notice == {"jsonrpc": "2.0", "method": "mesh.service_gone", "params": {"service": "edgeprobe"}}
    assert 0.9 < time.monotonic() - gone_at < 5.0
    closing = user.recv()
    assert error_code(closing) == jsonrpc.NO_INSTANCE and closing["id"] is None
    assert user.closed()
    assert bystander.call("mesh.ping")["result"] == "pong"  # it never called edgeprobe


def test_bad_backends_never_take_the_gateway_or_other_clients_down(
    start_service: StartService, clients: Clients
) -> None:
    start_service(BAD)
    start_service(PROBE)
    gw, address = start_gateway(start_service)
    abusers = [from_address(clients, address, f"192.0.2.{50 + i}") for i in range(4)]
    bystander = from_address(clients, address, "192.0.2.60")
    for _ in range(5):
        for abuser in abusers:
            ids = [abuser.request(m) for m in ("badbackend.fail", "badbackend.nan", "badbackend.huge")]
            failed, nan, huge = (abuser.answer(i) for i in ids)
            assert error_code(failed) == jsonrpc.HANDLER_ERROR
            assert failed["error"]["message"] == "RuntimeError: this backend fails every call"
            assert error_code(nan) == jsonrpc.INTERNAL_ERROR and error_code(huge) == jsonrpc.INTERNAL_ERROR
        assert "result" in bystander.call("edgeprobe.whoami")
    assert gw.running()
    for abuser in abusers:
        assert abuser.call("mesh.ping")["result"] == "pong"  # every connection is still open
