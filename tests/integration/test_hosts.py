"""Calls across hosts: three namespace hosts (``host_network``), today's code, no security yet.

Host 1 runs Redis (on its 198.18.x address) and a caller; hosts 2 and 3 each
run one ``echo`` instance that binds and advertises its own host address. The
caller is a child process on host 1 (this file run as a script, see
:func:`caller_main`) that calls ``echo`` (idempotent) and ``whoami`` (not) in a
loop and writes one JSON line per call; the test reads those lines. The test
process itself never connects to a host address: from the machine's own
namespace those addresses are not the test's hosts. It reads the registry
through Redis's unix socket, which is a file, not a network address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshkit import Settings, curve
from meshkit.testing import (
    HostNetwork,
    HostProcess,
    MakeHosts,
    find_program,
    read_records,
    settings_env,
    test_settings,
    wait_until,
)
from meshkit.testing.hosts import list_namespaces, remove_namespaces

pytestmark = pytest.mark.integration

# Redis cannot bind port 0 and report it. A fixed port is safe here: it is
# inside host 1's namespace, which only this test uses, so it cannot collide
# with anything else on the machine.
REDIS_PORT = 6390
TTL = 5.0
CALL_TIMEOUT = 3.0


@dataclass(frozen=True)
class Call:
    """One call the caller made (times are ``time.monotonic()``, shared by every namespace)."""

    method: str
    started: float
    ended: float
    result: Any
    error: str | None

    @property
    def latency(self) -> float:
        return self.ended - self.started


def read_calls(path: Path) -> list[Call]:
    calls = []
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        if "m" in raw:
            calls.append(Call(raw["m"], raw["s"], raw["e"], raw.get("r"), raw.get("err")))
    return calls


def start_redis(net: HostNetwork, directory: Path) -> tuple[str, str]:
    """Redis on host 1's address (and a unix socket for this process); (tcp url, unix url)."""
    sock = directory / "redis.sock"
    proc = net[1].run([find_program("redis-server"), "--bind", net[1].address, "--port", str(REDIS_PORT),
                       "--protected-mode", "no", "--unixsocket", str(sock), "--unixsocketperm", "700",
                       "--save", "", "--appendonly", "no", "--dir", str(directory)], label="redis")
    unix_url = f"unix://{sock}"
    probe = test_settings(unix_url)
    wait_until(lambda: _running(proc) and read_records(probe) == [], 10.0, "redis-server on host 1")
    return f"redis://{net[1].address}:{REDIS_PORT}/0", unix_url


def _running(proc: HostProcess) -> bool:
    if not proc.running():
        raise AssertionError(f"{proc.argv[0]} on {proc.host} exited: {proc.tail()}")
    return True


def start_echo(net: HostNetwork, index: int, settings: Settings, unix: Settings) -> str:
    """One echo instance on host ``index``, bound to and advertising its address; its instance id."""
    host = net[index]
    env = settings_env(settings) | {"MESHKIT_BIND_HOST": host.address, "MESHKIT_ADVERTISE_HOST": host.address}
    proc = host.run([sys.executable, "-m", "meshkit", "run", "services.echo:Echo"], env=env, label="echo")
    found: list[str] = []

    def registered() -> bool:
        _running(proc)
        found[:] = [r.instance_id for r in read_records(unix, "echo")
                    if r.is_up and r.endpoint.startswith(f"tcp://{host.address}:")]
        return bool(found)

    wait_until(registered, 20.0, f"echo on {host.name} to register")
    return found[0]


def hosts_of(unix: Settings) -> set[str]:
    """The addresses that ``echo`` records in the registry advertise right now."""
    return {r.endpoint.split("//")[1].rsplit(":", 1)[0] for r in read_records(unix, "echo")}


def bad_calls(calls: list[Call]) -> list[str]:
    return [f"{c.method}@{c.started:.2f} {c.error} ({c.latency:.2f}s)" for c in calls if c.error]


def test_calls_cross_hosts_and_route_around_a_cut_and_a_dead_host(
        host_network: MakeHosts, tmp_path: Path) -> None:
    net = host_network(3)
    tcp_url, unix_url = start_redis(net, tmp_path)
    keys = tmp_path / "keys"  # CurveZMQ is on across hosts (meshkit.curve): a keypair for each role
    for name in ("echo", "client"):
        curve.generate(keys, name)
    settings = test_settings(tcp_url, ttl=TTL, heartbeat_interval=0.5, call_timeout=CALL_TIMEOUT,
                             key_dir=str(keys))
    unix = settings.replace(redis_url=unix_url)
    h2_id = start_echo(net, 2, settings, unix)
    h3_id = start_echo(net, 3, settings, unix)

    out, stop = tmp_path / "calls.jsonl", tmp_path / "stop"
    caller = net[1].run([sys.executable, __file__, str(out), str(stop), "2"],
                        env=settings_env(settings), label="caller")

    def calls() -> list[Call]:
        _running(caller)
        return read_calls(out) if out.exists() else []

    def served_by(ids: set[str], since: float) -> bool:
        return ids <= {c.result for c in calls() if c.method == "whoami" and c.started >= since}

    try:
        # 1. Across hosts: the caller on host 1 reaches both instances.
        wait_until(lambda: served_by({h2_id, h3_id}, 0.0), 20.0, "calls served on hosts 2 and 3")
        assert not bad_calls(calls())

        # 2. Host 3's link cut (shorter than the TTL: its record stays listed).
        cut_at = time.monotonic()
        net.cut(net[3])
        wait_until(lambda: len([c for c in calls() if c.started > cut_at + 2.0]) >= 30, 15.0,
                   "calls after the cut")
        restored_at = time.monotonic()
        net.restore(net[3])
        wait_until(lambda: served_by({h3_id}, restored_at), 15.0, "host 3 used again after the restore")
        during = [c for c in calls() if cut_at - CALL_TIMEOUT < c.started < restored_at]
        route_around = _route_around(during, cut_at)
        recovered = min(c.ended for c in calls()
                        if c.method == "whoami" and c.result == h3_id and c.started >= restored_at)

        # 3. Host 3 dies with its network: link down, every process SIGKILLed.
        dead_at = time.monotonic()
        net.cut(net[3])
        net[3].kill_all()
        wait_until(lambda: net[3].address not in hosts_of(unix), TTL + 10.0, "host 3's record to expire")
        expired_at = time.monotonic()
        wait_until(lambda: len([c for c in calls() if c.started > expired_at]) >= 30, 15.0,
                   "calls after the expiry")
        stop.touch()
        wait_until(lambda: not caller.running(), 10.0, "the caller to stop")
    finally:
        stop.touch()
    assert caller.process.returncode == 0, caller.tail()
    final = read_calls(out)

    # Idempotent calls never fail, whatever happens to a host.
    assert not bad_calls([c for c in final if c.method == "echo"])
    # A non-idempotent call may fail, but only if it was in flight to host 3
    # when it was cut, and only as a lost peer.
    failed = [c for c in final if c.error]
    assert all(c.error == "LostPeerError" for c in failed), bad_calls(failed)
    assert all(_near(c, cut_at) or _near(c, dead_at) for c in failed), bad_calls(failed)
    # Callers route around the cut within about a second (slack for a noisy machine).
    assert route_around < 2.0, (route_around, bad_calls(during))
    # While host 3 is away, host 2 serves everything, and promptly.
    away = [c for c in final if cut_at + 2.0 < c.started < restored_at or c.started > dead_at + 2.0]
    assert away and all(c.error is None and c.latency < 0.5 for c in away)
    assert all(c.result == h2_id for c in away if c.method == "whoami")
    # Back within two retry periods of the pool (2 s each) plus a connect.
    assert recovered - restored_at < 8.0
    print(f"\nhosts: {len(final)} calls; routed around the cut in {route_around:.2f}s; "
          f"host 3 used again {recovered - restored_at:.2f}s after the restore; "
          f"dead host's record gone {expired_at - dead_at:.2f}s after it died (TTL {TTL}s); "
          f"{len(failed)} whoami lost in flight")


def _route_around(calls: list[Call], cut_at: float) -> float:
    """Seconds from the cut until calls complete normally again (0 if none was held up).

    A call is held up if it failed or took longer than 0.3 s and it was still
    running at the cut or started after it.
    """
    held = [c.ended - cut_at for c in calls if c.ended > cut_at and (c.error or c.latency > 0.3)]
    return max(held, default=0.0)


def _near(call: Call, event: float) -> bool:
    """Started before ``event`` (and so possibly in flight) or at most a second after it."""
    return event - CALL_TIMEOUT < call.started < event + 1.0


def test_cut_between_two_hosts_leaves_the_others_connected(host_network: MakeHosts) -> None:
    """The fixture itself: blackhole routes part exactly two hosts, and restore joins them again."""
    net = host_network(3)
    server = net[2].run([sys.executable, "-c", LISTENER, net[2].address], label="listener")
    wait_until(lambda: _running(server) and "port" in server.tail(), 10.0, "the listener on host 2")
    port = server.tail().split()[-1]

    def reaches(index: int) -> bool:
        probe = net[index].run([sys.executable, "-c", PROBE, net[2].address, port], label="probe")
        return probe.process.wait(10) == 0

    assert reaches(1) and reaches(3)
    net.cut(net[1], net[2])
    assert not reaches(1)
    assert reaches(3)
    net.restore(net[1], net[2])
    assert reaches(1)


def test_a_crashed_runs_leftovers_are_removed_at_the_next_start(host_network: MakeHosts) -> None:
    """Namespaces of ours whose owner pid is gone are removed (with what runs inside); a live run's stay."""
    ip = find_program("ip")
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = f"mkh-{gone.pid}-abcdef-h1", f"mkh-{os.getpid()}-fedcba-h1"
    for name in (stale, live):
        subprocess.run([ip, "netns", "add", name], check=True)
    inside = subprocess.Popen([ip, "netns", "exec", stale, "sleep", "60"])
    try:
        wait_until(lambda: inside.pid in _pids(ip, stale), 10.0, "a process inside the stale namespace")
        host_network(1)
        assert inside.wait(10) == -signal.SIGKILL
        assert stale not in list_namespaces()
        assert live in list_namespaces()
    finally:
        inside.kill()
        inside.wait(10)
        remove_namespaces([stale, live])


def _pids(ip: str, netns: str) -> set[int]:
    out = subprocess.run([ip, "netns", "pids", netns], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in out.split()}


LISTENER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(16)
print("port", s.getsockname()[1], flush=True)
while True:
    s.accept()[0].close()
"""

PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 0.5).close()
except OSError:
    sys.exit(1)
"""


def caller_main(out: str, stop: str, expect: int) -> int:
    """Call ``echo`` and ``whoami`` in turn until ``stop`` exists (60 s at most); a line per call."""
    from meshkit import Client, MeshError

    deadline = time.monotonic() + 60.0
    with Client(Settings.load()) as client, open(out, "a", buffering=1) as log:
        wait_until(lambda: len(client.instances("echo")) >= expect, 20.0, "the echo instances")
        i = 0
        while not os.path.exists(stop) and time.monotonic() < deadline:
            method = "echo" if i % 2 == 0 else "whoami"
            args = [i] if method == "echo" else []
            started = time.monotonic()
            result: Any = None
            error = None
            try:
                result = client.call("echo", method, args)
            except MeshError as exc:
                error = type(exc).__name__
            log.write(json.dumps({"m": method, "s": started, "e": time.monotonic(),
                                  "r": result if method == "whoami" else None, "err": error}) + "\n")
            i += 1
            time.sleep(0.01)  # pacing: about 50 calls a second, leaving the two cores to the hosts
    return 0


if __name__ == "__main__":
    sys.exit(caller_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
