"""The registry behind Sentinel, on three namespace hosts: the primary is lost under load.

Host 1 runs the primary and a Sentinel; host 2 a replica, a Sentinel and one
``echo`` instance; host 3 a Sentinel, one ``echo`` instance and the caller
(``test_hosts.py`` run as a script: ``echo`` and ``whoami`` in a loop, a JSON
line per call). Every one of them reaches Redis through
``redis+sentinel://h1,h2,h3/mk``. The test loses the primary (SIGKILL, or its
host's link cut, which takes host 1's Sentinel with it) and measures, from
the loss:

* ``promoted``: the replica answers as the primary;
* ``re-registered``: every instance's record has been written on the new
  primary (its remaining TTL is longer than a record written before the kill
  can have);
* and then, to show that the views follow the new primary too, an instance
  started after the failover is called by the caller.

Calls between the known instances never stop: none fails and none waits.
The test process reads the servers through their unix sockets only.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import pytest
from rediskit import REDIS_PORT, SENTINEL_PORT, HostRedis, running, start_redis, start_sentinel
from test_hosts import Call, bad_calls, read_calls

from meshkit import Settings, curve
from meshkit.testing import HostNetwork, MakeHosts, read_records, settings_env, test_settings, wait_until

pytestmark = pytest.mark.integration

MASTER = "mk"
TTL = 5.0
HEARTBEAT = 0.5


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["killed", "cut off"])
def test_losing_the_primary_under_load_fails_over_with_no_failed_call(
        host_network: MakeHosts, tmp_path: Path, loss: str) -> None:
    net = host_network(3)
    primary = start_redis(net[1], tmp_path / "h1-redis")
    replica = start_redis(net[2], tmp_path / "h2-redis", "--replicaof", net[1].address, str(REDIS_PORT))
    wait_until(lambda: _replication(replica)["master_link_status"] == "up", 10.0, "the replica to sync")
    sentinels = [start_sentinel(net[i], tmp_path / f"h{i}-sentinel", primary, MASTER) for i in (1, 2, 3)]
    wait_until(lambda: all(_knows_everyone(s) for s in sentinels), 20.0, "the Sentinels to find each other")

    url = "redis+sentinel://" + ",".join(f"{h.address}:{SENTINEL_PORT}" for h in net.hosts) + f"/{MASTER}"
    keys = tmp_path / "keys"  # CurveZMQ is on across hosts (meshkit.curve): a keypair for each role
    for name in ("echo", "client"):
        curve.generate(keys, name)
    settings = test_settings(url, ttl=TTL, heartbeat_interval=HEARTBEAT, call_timeout=3.0, key_dir=str(keys))
    echo2 = _start_echo(net, 2, settings, primary)
    echo3 = _start_echo(net, 3, settings, primary)
    out, stop = tmp_path / "calls.jsonl", tmp_path / "stop"
    import test_hosts

    caller = net[3].run([sys.executable, test_hosts.__file__, str(out), str(stop), "2"],
                        env=settings_env(settings), label="caller")

    def calls() -> list[Call]:
        running(caller)
        return read_calls(out) if out.exists() else []

    try:
        wait_until(lambda: {echo2, echo3} <= {c.result for c in calls() if c.method == "whoami"}, 20.0,
                   "calls served by both instances")
        killed_at = time.monotonic()
        if loss == "killed":
            primary.process.kill()
        else:  # its host's link cut: connections to it hang instead of being refused
            net.cut(net[1])

        wait_until(lambda: _replication(replica)["role"] == "master", 15.0, "the replica to be promoted")
        promoted = time.monotonic() - killed_at
        wait_until(lambda: _rewritten_since(replica, settings.namespace, killed_at) == {echo2, echo3}, 15.0,
                   "every instance to re-register on the new primary")
        reregistered = time.monotonic() - killed_at

        # The views follow the new primary: an instance that exists only there is found and called.
        late_at = time.monotonic()
        late = _start_echo(net, 2, settings, replica)
        wait_until(lambda: late in {c.result for c in calls() if c.method == "whoami"}, 15.0,
                   "the caller to call an instance registered after the failover")
        late_seen = time.monotonic() - late_at
        stop.touch()
        wait_until(lambda: not caller.running(), 10.0, "the caller to stop")
    finally:
        stop.touch()
    assert caller.process.returncode == 0, caller.tail()
    final = read_calls(out)
    through = [c for c in final if c.started > killed_at - 1.0]
    assert through and not bad_calls(final)
    assert all(c.latency < 0.5 for c in through), max(c.latency for c in through)
    starts = sorted(c.started for c in through)
    gap = max(b - a for a, b in itertools.pairwise(starts))
    assert gap < 0.5, gap
    assert _sentinel_master(sentinels[2]) == net[2].address
    print(f"\nsentinel, primary {loss}: {len(through)} calls through the failover, none failed, "
          f"longest gap {gap:.2f}s; "
          f"to promotion {promoted:.2f}s, to every instance re-registered {reregistered:.2f}s; "
          f"an instance started after it was called {late_seen:.2f}s after its start")


def _knows_everyone(sentinel: HostRedis) -> bool:
    with sentinel.client() as client:
        fields = client.sentinel_master(MASTER)
    return bool(fields["num-other-sentinels"] == 2 and fields["num-slaves"] == 1)


def _sentinel_master(sentinel: HostRedis) -> str:
    with sentinel.client() as client:
        host, _port = client.sentinel_get_master_addr_by_name(MASTER)
    return host.decode() if isinstance(host, bytes) else str(host)


def _rewritten_since(server: HostRedis, namespace: str, since: float) -> set[str]:
    """The instance ids whose record on ``server`` was written after ``since`` (``time.monotonic()``).

    A record written at ``t`` has a remaining TTL of ``TTL - (now - t)``, so
    one written before ``since`` has at most ``TTL - (now - since)`` left.
    """
    found = set()
    with server.client() as client:
        for key in client.scan_iter(match=f"{namespace}:inst:echo:*"):
            left = client.pttl(key) / 1000.0
            if left > TTL - (time.monotonic() - since) + 0.2:
                found.add(key.decode().rsplit(":", 1)[1])
    return found


def _replication(server: HostRedis) -> dict[str, object]:
    with server.client() as client:
        info: dict[str, object] = client.info("replication")
    return info


def _start_echo(net: HostNetwork, index: int, settings: Settings, server: HostRedis) -> str:
    """An echo instance on host ``index`` (its own address), registered on ``server``; its instance id."""
    host = net[index]
    before = {r.instance_id for r in read_records(settings.replace(redis_url=server.unix_url), "echo")}
    env = settings_env(settings) | {"MESHKIT_BIND_HOST": host.address, "MESHKIT_ADVERTISE_HOST": host.address}
    proc = host.run([sys.executable, "-m", "meshkit", "run", "services.echo:Echo"], env=env, label="echo")
    found: list[str] = []

    def registered() -> bool:
        running(proc)
        found[:] = [r.instance_id for r in read_records(settings.replace(redis_url=server.unix_url), "echo")
                    if r.instance_id not in before and r.endpoint.startswith(f"tcp://{host.address}:")]
        return bool(found)

    wait_until(registered, 20.0, f"echo on {host.name} to register")
    return found[0]
