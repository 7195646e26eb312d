"""READONLY from a demoted primary makes meshkit's clients find the primary again.

The failure this guards against: a primary demoted to a replica without
dropping its clients (a failover seen through a partition, a manual
``REPLICAOF``) answers every write with ``READONLY``, and a client that keeps
its pooled connection keeps getting it for ever.

The set-up, on one namespace host (replication needs TCP; the test process
itself uses only unix sockets): primaries A and B, and ``current.sock``, a
symlink that names "the primary" (standing in for what Sentinel or DNS would
answer). Registrations and a registry view connect through the symlink to A.
Then A is demoted (``REPLICAOF`` B, connections kept) and the symlink moved to
B. A plain redis-py client connected before the switch gets ``READONLY`` on
every write; meshkit's heartbeat writes land on B at their next beat with no
failed write at all, and the view follows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.exceptions import ReadOnlyError
from rediskit import REDIS_PORT, HostRedis, start_redis

from meshkit import Settings
from meshkit.record import InstanceRecord
from meshkit.registry import Registry
from meshkit.testing import MakeHosts, test_settings

pytestmark = pytest.mark.integration


def test_a_demoted_primary_is_left_at_the_next_write(host_network: MakeHosts, tmp_path: Path) -> None:
    net = host_network(1)
    a = start_redis(net[1], tmp_path / "a", port=REDIS_PORT, label="a")
    b = start_redis(net[1], tmp_path / "b", port=REDIS_PORT + 1, label="b")
    current = tmp_path / "current.sock"
    current.symlink_to(a.socket)
    settings = test_settings(f"unix://{current}", heartbeat_interval=0.2, ttl=3.0)

    plain = redis.Redis(unix_socket_path=str(current), socket_timeout=2.0)  # redis-py as it comes
    plain.set(f"{settings.namespace}:plain", "1")
    asyncio.run(_demote_and_follow(settings, a, b, current, plain))
    plain.close()


async def _demote_and_follow(settings: Settings, a: HostRedis, b: HostRedis, current: Path,
                             plain: redis.Redis) -> None:
    errors: list[int] = []
    view = Registry(settings)
    await view.start()
    first = view.registration(InstanceRecord("echo", "e1", "tcp://198.18.0.1:1", "h1", 1),
                              on_error=lambda: errors.append(1))
    await first.start()
    key = settings.namespace + ":inst:echo:e1"
    try:
        await _until(lambda: view.get("echo:e1") is not None, 5.0, "the view to see e1")
        admin_a, admin_b = a.client(), b.client()
        assert admin_a.exists(key) and not admin_b.exists(key)

        # Demote A under everyone's feet, then say that B is the primary now.
        admin_a.execute_command("REPLICAOF", b.host.address, str(b.port))
        moved = current.with_name("current.sock.new")
        moved.symlink_to(b.socket)
        os.replace(moved, current)

        # redis-py as it comes: READONLY, and READONLY again, on its kept connection.
        for _ in range(2):
            with pytest.raises(ReadOnlyError):
                plain.set(f"{settings.namespace}:plain", "2")

        # meshkit: the next heartbeat gets READONLY, drops that connection and writes to B.
        await _until(lambda: admin_b.exists(key), 5.0, "e1's heartbeat to reach B")
        assert first.healthy and not errors, (first.last_error, errors)

        # The view follows: a registration made after the switch, and a state change, are seen.
        second = view.registration(InstanceRecord("echo", "e2", "tcp://198.18.0.2:1", "h2", 2))
        await second.start()
        await first.set_state("draining")
        await _until(lambda: view.get("echo:e2") is not None and not view.get("echo:e1").is_up,  # type: ignore[union-attr]
                     5.0, "the view to see e2 and e1 draining")
        assert admin_b.exists(settings.namespace + ":inst:echo:e2")
        await second.stop()
        admin_a.close()
        admin_b.close()
    finally:
        await first.stop()
        await view.close()


async def _until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)
