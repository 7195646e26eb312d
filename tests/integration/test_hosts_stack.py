"""The same ``configs/circus-hosts.ini`` on three namespace hosts, with Redis on a fourth.

Every stack host runs ``meshkit up`` on the same file; only the environment
differs (its address, whether it runs HAProxy, how many of each process):

* h1: HAProxy (its own sync), a gateway, a share checker;
* h2: HAProxy (its own sync), a gateway, a share checker, the job announcer;
* h3: a gateway, a share checker;
* h4: Redis, nothing else.

Stratum clients (``hostminers.py`` on h1) connect through both HAProxies;
HAProxy's leastconn spreads them over the gateways of all three hosts, so
every call and push crosses hosts. Then, under that load: h3's link is cut
and restored, Redis's host is cut off and restored, and h3 dies outright.
The test process reads Redis through its unix socket only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rediskit import REDIS_PORT, running, start_redis

from meshkit.testing import HostNetwork, MakeHosts, read_records, settings_env, test_settings, wait_until
from meshkit.testing.hosts import HostProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INI = ROOT / "configs" / "circus-hosts.ini"
STRATUM_PORT = 3333  # inside the hosts' own namespaces only
TTL = 5.0
ROLES = {  # host index -> (HAProxy, gateways, share checkers, job announcers)
    1: ("true", 1, 1, 0),
    2: ("true", 1, 1, 1),
    3: ("false", 1, 1, 0),
}


@dataclass(frozen=True)
class Event:
    kind: str
    client: str
    gateway: str | None
    at: float
    raw: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.raw.get("ok"))

    @property
    def latency(self) -> float:
        return float(self.raw["e"] - self.raw["s"])


def read_events(path: Path) -> list[Event]:
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        events.append(Event(raw["k"], raw["c"], raw.get("gw"), raw.get("t", raw.get("s", 0.0)), raw))
    return events


def start_stacks(net: HostNetwork, tmp_path: Path, redis_url: str) -> tuple[dict[int, Path], Any]:
    """``meshkit up --daemon`` on hosts 1-3 at once; their run directories and the settings."""
    settings = test_settings(redis_url, ttl=TTL, heartbeat_interval=0.5, resync_interval=1.0, drain_grace=3.0)
    config = tmp_path / "meshkit.toml"
    config.write_text("[services.jobs]\njob_interval = 1.0\n")
    runs, ups = {}, {}
    for index, (haproxy, gateways, mining, jobs) in ROLES.items():
        host = net[index]
        runs[index] = tmp_path / f"run-h{index}"
        env = settings_env(settings) | {
            "MESHKIT_HOME": str(ROOT), "MESHKIT_CONFIG": str(config), "MESHKIT_BIND_HOST": host.address,
            "MESHKIT_ADVERTISE_HOST": host.address, "MESHKIT_STRATUM_HOST": host.address,
            "MESHKIT_STRATUM_PORT": str(STRATUM_PORT), "MESHKIT_HOST_HAPROXY": haproxy,
            "MESHKIT_HOST_GATEWAYS": str(gateways), "MESHKIT_HOST_MINING": str(mining),
            "MESHKIT_HOST_JOBS": str(jobs)}
        ups[index] = host.run([sys.executable, "-m", "meshkit", "up", "--daemon", "--circus-ini", str(INI),
                               "--run-dir", str(runs[index]), "--timeout", "100"], env=env, label="up")
    for index, up in ups.items():
        try:
            code = up.process.wait(110)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"meshkit up on h{index}: {code}\n{up.tail(30)}"
    return runs, settings


def stop_stacks(net: HostNetwork, runs: dict[int, Path]) -> None:
    downs = [(i, net[i].run([sys.executable, "-m", "meshkit", "down", "--run-dir", str(run), "--timeout", "30"],
                            label="down")) for i, run in runs.items()]
    for _, down in downs:
        try:
            down.process.wait(60)
        except subprocess.TimeoutExpired:
            down.kill()


@pytest.mark.slow
def test_one_circus_ini_on_three_hosts_through_a_cut_a_lost_redis_and_a_dead_host(
        host_network: MakeHosts, tmp_path: Path) -> None:
    net = host_network(4)
    redis = start_redis(net[4], tmp_path / "redis")
    began = time.monotonic()
    runs, settings = start_stacks(net, tmp_path, f"redis://{net[4].address}:{REDIS_PORT}/0")
    stack_up = time.monotonic() - began
    unix = settings.replace(redis_url=redis.unix_url)
    gateway_host = {r.instance_id: r.endpoint.split("//")[1].rsplit(":", 1)[0]
                    for r in read_records(unix, "gateway")}
    assert sorted(gateway_host.values()) == sorted(net[i].address for i in ROLES), gateway_host
    h3_gateways = {g for g, a in gateway_host.items() if a == net[3].address}

    out, stop = tmp_path / "events.jsonl", tmp_path / "stop"
    miners = [net[1].run([sys.executable, str(Path(__file__).with_name("hostminers.py")), str(out), str(stop),
                          f"{net[i].address}:{STRATUM_PORT}", "6", f"via{i}-"], label=f"miners{i}")
              for i in (1, 2)]

    def events() -> list[Event]:
        for miner in miners:
            running(miner)
        return read_events(out)

    try:
        # 1. Calls and pushes across hosts, through both HAProxies.
        for tag in ("via1-", "via2-"):  # each HAProxy, with its own sync, reaches every host's gateway
            wait_until(lambda t=tag: _gateways_serving(events(), 0.0, t) == set(gateway_host), 30.0,
                       f"calls through HAProxy {tag[:-1]} answered by the gateways of every host")
        wait_until(lambda: {e.gateway for e in events() if e.kind == "push"} == set(gateway_host), 15.0,
                   "pushes delivered through the gateways of every host")
        assert not [e for e in events() if e.kind in ("lost", "refused")]

        # 2. h3's link cut under load, then restored.
        cut_at = time.monotonic()
        net.cut(net[3])
        wait_until(lambda: _calls_after(events(), cut_at + 2.0) >= 60, 20.0, "calls after the cut")
        wait_until(lambda: [e for e in events() if e.kind == "hello" and e.at > cut_at], 10.0,
                   "the clients h3's gateway held to reconnect")
        restored_at = time.monotonic()
        net.restore(net[3])
        fresh = _more_miners(net, out, stop, "after-cut-", miners)
        wait_until(lambda: h3_gateways & _gateways_serving(events(), restored_at), 20.0,
                   "h3's gateway used again after the restore")
        back = time.monotonic() - restored_at

        # 3. Redis's host cut off: traffic between known instances goes on.
        redis_cut_at = time.monotonic()
        net.cut(net[4])
        wait_until(lambda: _calls_after(events(), redis_cut_at + 1.0) >= 60, 20.0, "calls without Redis")
        redis_back_at = time.monotonic()
        net.restore(net[4])

        # 4. h3 dies: link down and every process in it killed.
        dead_at = time.monotonic()
        net.cut(net[3])
        net[3].kill_everything()
        wait_until(lambda: not {r.instance_id for r in read_records(unix)} & h3_gateways, TTL + 10.0,
                   "h3's records to expire")
        wait_until(lambda: _calls_after(events(), time.monotonic() - 1.0) >= 10, 10.0, "calls after h3 died")
        stop.touch()
        for miner in [*miners, fresh]:
            wait_until(lambda m=miner: not m.running(), 15.0, "the miners to stop")
    finally:
        stop.touch()
        stop_stacks(net, {i: r for i, r in runs.items() if i != 3})
    final = read_events(out)

    calls = [e for e in final if e.kind == "call"]
    marks = f"cut {cut_at:.2f}, restored {restored_at:.2f}, redis cut {redis_cut_at:.2f}, dead {dead_at:.2f}"
    # mining.extranonce.subscribe is not idempotent: one sent to h3's share checker before its loss
    # was noticed may fail (it is never sent twice), and only then.
    failed = [e for e in calls if not e.ok]
    assert all(_in_flight(e, cut_at) or _in_flight(e, dead_at) for e in failed), (marks, [e.raw for e in failed])
    # Only connections held by h3's gateway ever broke, and only when h3 was cut or died.
    lost = [e for e in final if e.kind == "lost"]
    assert all(e.gateway in h3_gateways for e in lost), (marks, [e.raw for e in lost])
    assert all(_near(e.at, cut_at) or _near(e.at, dead_at) for e in lost), (marks, [e.raw for e in lost])
    # HAProxy's health checks see through the partition: while h3 is cut off (its record still
    # listed for a TTL), the clients it lost reconnect to gateways on other hosts.
    rejoined = [e for e in final if e.kind == "hello" and cut_at < e.at < restored_at]
    assert rejoined and not [e for e in rejoined if e.gateway in h3_gateways], [e.raw for e in rejoined]
    # Connections through other hosts' gateways: calls held up by the cut for about a second at most.
    others = [e for e in calls if e.gateway not in h3_gateways]
    held = max((e.raw["e"] - cut_at for e in others if e.raw["e"] > cut_at and e.latency > 0.3
                and e.raw["s"] < cut_at + 5.0), default=0.0)
    assert held < 2.0, held
    # Without Redis, every call is answered and promptly.
    blind = [e for e in calls if redis_cut_at < e.raw["s"] < redis_back_at]
    assert blind and all(e.latency < 0.5 for e in blind), max(e.latency for e in blind)
    print(f"\nhosts stack: up on 3 hosts in {stack_up:.1f}s; {len(calls)} calls, "
          f"{len([e for e in final if e.kind == 'push'])} pushes, {len(lost)} connections lost (all on h3); "
          f"calls through other hosts held up by the cut {held:.2f}s at most; "
          f"h3's gateway used again {back:.2f}s after the restore; {len(blind)} calls while Redis was cut off")


def _gateways_serving(events: list[Event], since: float, tag: str = "") -> set[str]:
    return {e.gateway for e in events if e.kind == "call" and e.ok and e.raw["s"] >= since and e.gateway
            and e.client.startswith(tag)}


def _calls_after(events: list[Event], since: float) -> int:
    return len([e for e in events if e.kind == "call" and e.raw["s"] > since])


def _in_flight(call: Event, event: float) -> bool:
    return call.raw["s"] < event + 1.5 and call.raw["e"] > event and call.raw["err"]["data"]["code"] == "lost_peer"


def _near(at: float, event: float) -> bool:
    return event - 1.0 < at < event + 6.0


def _more_miners(net: HostNetwork, out: Path, stop: Path, tag: str, miners: list[HostProcess]) -> HostProcess:
    """Three clients through h1's HAProxy that reconnect every five calls: new connections all the time."""
    proc = net[1].run([sys.executable, str(Path(__file__).with_name("hostminers.py")), str(out), str(stop),
                       f"{net[1].address}:{STRATUM_PORT}", "3", tag, "5"], label="miners-late")
    miners.append(proc)
    return proc

