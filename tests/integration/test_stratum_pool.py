"""The demo Stratum v1 pool with real processes: HAProxy -> gateway (stratum dialect) -> mining.

Also the gateway's push to one connection (``meshkit.gateway.push_to_connection``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from haproxykit import REPO, Sync, kill_haproxy
from lineclient import LineClient, line_clients

from meshkit import Client, Settings
from meshkit.testing import ServiceProcess, tcp_listener, wait_until
from services.stratum.mining import Work
from services.stratum.target import dsha256, hash_value, share_target

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
MINING = "services.mining:Mining"
JOBS = "services.pooljobs:PoolJobs"
PROBE = "tests.integration.services.pushprobe:PushProbe"
MIN_DIFFICULTY = 2.0**-16
StartService = Callable[..., list[ServiceProcess]]

POOL_CONFIG = f"""
[services.jobs]
job_interval = 0.5
block_interval = 3600.0

[services.mining]
share_interval = 1.0
min_difficulty = {MIN_DIFFICULTY!r}
burst_shares = 8
retarget_interval = 30.0

[services.gateway]
dialect = "stratum"
services = ["mining", "pushprobe"]
topics = ["mining.notify", "probe.*"]
"""


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


@pytest.fixture
def pool(start_service: StartService, mesh_settings: Settings, tmp_path: Path) -> Iterator[str]:
    """The pool's processes and HAProxy in front; yields HAProxy's public ``host:port``."""
    config = tmp_path / "pool.toml"
    config.write_text(POOL_CONFIG)
    env = {"MESHKIT_CONFIG": str(config)}
    start_service(JOBS, env=env)
    start_service(MINING, count=2, env=env)
    start_service(PROBE, env=env)
    start_service(GATEWAY, env=env)
    public = tcp_listener()
    sync = Sync(mesh_settings, tmp_path, public).start()
    address = f"127.0.0.1:{sync.port}"
    wait_until(lambda: any(s.up and not s.in_maintenance for s in (sync.servers() or {}).values()), 15,
               "HAProxy to have the gateway up")
    yield address
    sync.stop()
    kill_haproxy(sync.paths)
    public.close()


class Miner:
    """A Stratum line client that keeps pushes apart from answers."""

    def __init__(self, client: LineClient) -> None:
        self.client = client
        self.ids = iter(range(1, 10**6))

    def call(self, method: str, params: list[Any]) -> dict[str, Any]:
        rid = next(self.ids)
        self.client.send({"id": rid, "method": method, "params": params})
        return self.client.answer(rid)

    def push(self, method: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first push of ``method`` received (earlier ones of other methods are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, doc in enumerate(self.client.pushes):
                if doc.get("method") == method:
                    return self.client.pushes.pop(i)
            self.client.pushes.append(self.client.recv(max(0.01, deadline - time.monotonic())))

    def start(self, worker: str = "alice.rig1") -> tuple[str, bytes, int]:
        sub = self.call("mining.subscribe", ["test/1"])
        assert sub["error"] is None and "jsonrpc" not in sub, sub
        subscriptions, en1, en2size = sub["result"]
        assert subscriptions[0][0] == "mining.set_difficulty" and subscriptions[1][0] == "mining.notify"
        auth = self.call("mining.authorize", [worker, "x"])
        assert auth == {"id": auth["id"], "result": True, "error": None}
        return subscriptions[0][1], bytes.fromhex(en1), en2size


def find_nonce(work: Work, en1: bytes, en2: bytes, target: int, good: bool) -> int:
    base = work.header_base(en1, en2)
    for nonce in range(1 << 32):
        ok = hash_value(dsha256(base + nonce.to_bytes(4, "little"))) <= target
        if ok == good:
            return nonce
    raise AssertionError("no nonce")


def test_shares_are_judged_for_real_and_refused_as_pools_refuse_them(
    pool: str, clients: Callable[[str], LineClient], mesh_settings: Settings
) -> None:
    miner = Miner(clients(pool))
    conn_id, en1, en2size = miner.start()
    difficulty = miner.push("mining.set_difficulty")
    assert difficulty == {"id": None, "method": "mining.set_difficulty", "params": [MIN_DIFFICULTY]}
    notify = miner.push("mining.notify")
    assert notify["id"] is None and len(notify["params"]) == 9 and notify["params"][8] is True
    # The extranonce1 is the connection's, in its Redis state.
    with redis.Redis.from_url(mesh_settings.redis_url) as r:
        assert r.hget(f"{mesh_settings.namespace}:conn:{conn_id}", "extranonce1") == en1.hex().encode()
    work = Work.from_notify(notify["params"])
    en2 = bytes(en2size)
    target = share_target(MIN_DIFFICULTY)
    good = find_nonce(work, en1, en2, target, good=True)
    share = ["alice.rig1", work.job_id, en2.hex(), work.ntime_hex, f"{good:08x}"]
    assert miner.call("mining.submit", share) == {"id": 3, "result": True, "error": None}
    duplicate = miner.call("mining.submit", share)
    assert duplicate["result"] is None and duplicate["error"][:2] == [22, "Duplicate share"]
    low = find_nonce(work, en1, en2, target, good=False)
    answer = miner.call("mining.submit", [*share[:4], f"{low:08x}"])
    assert answer["error"][:2] == [23, "Low difficulty share"]
    answer = miner.call("mining.submit", ["alice.rig1", "ffffffffff", en2.hex(), work.ntime_hex, "00000000"])
    assert answer["error"][:2] == [21, "Job not found (=stale)"]
    answer = miner.call("mining.submit", [*share[:4], "xyz"])
    assert answer["error"][0] == 20 and "nonce must be 8 hex digits" in answer["error"][1]
    answer = miner.call("mining.submit", ["mallory", *share[1:]])
    assert answer["error"][:2] == [24, "Unauthorized worker"]
    answer = miner.call("mining.submit", share[:3])
    assert answer["error"][0] == 20
    answer = miner.call("mining.extranonce.subscribe", [])
    assert answer["result"] is True and answer["error"] is None
    unknown = miner.call("mining.nosuch", [])
    assert unknown["result"] is None and unknown["error"][0] == -32601, unknown
    stats = miner.call("mining.stats", [])["result"]
    assert stats["accepted"] == 1 and stats["rejected"] == 6
    # Another connection: its own extranonce1; shares before subscribing are refused.
    other = Miner(clients(pool))
    assert other.call("mining.submit", share)["error"][:2] == [25, "Not subscribed"]
    _, other_en1, _ = other.start("bob")
    assert other_en1 != en1


def test_the_shipped_miner_mines_through_haproxy_and_vardiff_retargets_its_connection_alone(
    pool: str, clients: Callable[[str], LineClient]
) -> None:
    idle = Miner(clients(pool))
    idle.start("idle")
    assert idle.push("mining.set_difficulty")["params"] == [MIN_DIFFICULTY]
    host, port = pool.rsplit(":", 1)
    run = subprocess.run([sys.executable, "-m", "services.stratum.miner", host, port, "--shares", "40",
                          "--seconds", "90"], capture_output=True, text=True, cwd=REPO, timeout=120)
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert stats["accepted"] >= 30 and stats["rejected"] == 0, stats
    # 8 shares within a second or so at the minimum: vardiff raised this connection's difficulty.
    assert stats["difficulty"] > MIN_DIFFICULTY, stats
    assert stats["jobs"] >= 1
    # ... and only this connection's: the idle one got no second set_difficulty.
    idle.client.send({"id": 99, "method": "mining.stats", "params": []})
    idle.client.answer(99)
    assert [p for p in idle.client.pushes if p["method"] == "mining.set_difficulty"] == []


def test_a_push_to_one_connection_reaches_it_alone_and_an_unknown_one_is_reported(
    pool: str, clients: Callable[[str], LineClient], mesh_client: Client
) -> None:
    a, b = Miner(clients(pool)), Miner(clients(pool))
    a_id, _, _ = a.start("a")
    b_id, _, _ = b.start("b")
    assert a.call("pushprobe.me", ["probe.hello", ["to", "me"]])["result"] is True
    assert a.push("probe.hello") == {"id": None, "method": "probe.hello", "params": ["to", "me"]}
    # By id, from outside any client call: the operator's client.reconnect.
    assert mesh_client.call("mining", "reconnect", [b_id, "127.0.0.1", 3333, 0]) is True
    assert b.push("client.reconnect")["params"] == ["127.0.0.1", 3333, 0]
    # Unknown connections are reported, not raised: a closed one, a made-up one, a dead gateway's.
    gateway = a_id.rsplit("-", 1)[0]
    for conn in (f"{gateway}-fffff", "nosuchgateway-1", "no-dash-at-the-end-", ""):
        assert mesh_client.call("pushprobe", "to", [conn, "probe.hello", [1]]) is False, conn
    # A client may not send client.reconnect to others.
    refused = a.call("mining.reconnect", [b_id, "evil.example", 1, 0])
    assert refused["result"] is None and refused["error"][1] == "mining.reconnect is not for clients"
    # Neither saw what was meant for the other (a marker push proves b's stream is read up to now).
    assert mesh_client.call("pushprobe", "to", [b_id, "probe.end", []]) is True
    b.push("probe.end")
    assert [p["method"] for p in b.client.pushes if p["method"].startswith("probe.")] == []
    assert [p for p in a.client.pushes if p["method"] == "client.reconnect"] == []
    # The gateway is fine: both connections still answer.
    assert a.call("mining.extranonce.subscribe", [])["result"] is True
    assert b.call("mining.extranonce.subscribe", [])["result"] is True
    # A connection that closed is reported the same way, once the gateway saw it go.
    b.client.sock.close()
    wait_until(lambda: mesh_client.call("pushprobe", "to", [b_id, "probe.hello", [2]]) is False, 10,
               "a push to the closed connection to be reported")


def test_pushes_to_one_connection_keep_their_order_with_the_same_publishers_topic_pushes(
    pool: str, clients: Callable[[str], LineClient], mesh_client: Client
) -> None:
    miner = Miner(clients(pool))
    conn_id, _, _ = miner.start("ordered")
    assert "probe.topic" in miner.call("mesh.subscribe", ["probe.topic"])["result"]
    count = 200
    # The probe sends them all at once, alternating: even ones to this connection, odd ones on the topic.
    assert all(mesh_client.call("pushprobe", "interleave", [conn_id, "probe.topic", count]))
    got = [doc["params"]["seq"] for doc in miner.client.pushes if doc.get("method") in ("probe.seq", "probe.topic")]
    deadline = time.monotonic() + 15
    while len(got) < count and time.monotonic() < deadline:
        doc = miner.client.recv()
        if doc.get("method") in ("probe.seq", "probe.topic"):
            got.append(doc["params"]["seq"])
    assert got == list(range(count))


def test_a_third_party_stratum_proxy_mines_on_the_pool(pool: str) -> None:
    """aiostratum-proxy 1.1 (PyPI, by wetblanketcc; not written here) between the shipped miner and the pool.

    The proxy subscribes upstream with its own client code (aiojsonrpc2), reads
    our JSON-RPC 1.0-style answers (``"error": null``, no ``"jsonrpc"``), is
    authorized, relays the per-connection ``mining.set_difficulty`` and
    ``mining.notify`` to its worker, and forwards the worker's shares, which the
    pool accepts. What it found: see the assertions, and the report in
    docs/stratum.md ("Tested with").
    """
    import importlib.util

    missing = [m for m in ("aiostratum_proxy", "aiojsonrpc2", "yaml") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed: run `make thirdparty` (make test does)"
    host, port = pool.rsplit(":", 1)
    script = Path(__file__).parent / "thirdparty" / "aiostratum_run.py"
    proxy = subprocess.Popen([sys.executable, str(script), host, port], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proxy.stdout is not None
        first = proxy.stdout.readline().split()
        assert first[:1] == ["listening"], first
        run = subprocess.run([sys.executable, "-m", "services.stratum.miner", "127.0.0.1", first[1],
                              "--worker", "proxy.rig1", "--shares", "12", "--seconds", "60"],
                             capture_output=True, text=True, cwd=REPO, timeout=90)
        stats = json.loads(run.stdout.strip().splitlines()[-1])
        assert stats["accepted"] >= 8 and stats["jobs"] >= 1 and stats["difficulty"] > 0, (stats, run.stderr[-2000:])
    finally:
        proxy.terminate()
        try:
            _, err = proxy.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            _, err = proxy.communicate()
    assert "Traceback" not in err, err[-3000:]
