"""An instance's life: hooks and periodic tasks, signals, and staying alive while busy."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from loadgen import Load

from meshkit import Client, Settings
from meshkit.registry import Keys
from meshkit.testing import read_records, wait_until

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
WORKER = "tests.integration.services.worker:Worker"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(start_service, mesh_settings: Settings, sig: signal.Signals) -> None:
    [echo, other] = start_service(ECHO, count=2)
    started = time.monotonic()
    assert echo.signal_and_wait(sig, 15) == 0, echo.tail()
    took = time.monotonic() - started
    # The record went with the process, not one TTL later.
    assert [r.instance_id for r in read_records(mesh_settings)] == [other.record.instance_id]
    assert took < 2.0, took
    assert "stopped" in echo.tail()


def test_hooks_and_periodic_tasks(start_service, mesh_client: Client, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    [worker] = start_service(WORKER, env={"WORKER_HOOKS_FILE": str(hooks)})
    # on_start ran before the instance was registered (start_service waits for that).
    assert hooks.read_text().splitlines()[0] == "start"
    wait_until(lambda: mesh_client.call("worker", "tick_count") >= 3, 3.0, "three periodic ticks")
    assert worker.terminate(15) == 0, worker.tail()
    lines = hooks.read_text().splitlines()
    assert lines[0] == "start" and lines[-1] == "stop"
    assert lines.count("tick") >= 3 and set(lines[1:-1]) == {"tick"}, lines  # no tick after stop


def test_blocked_plain_handler_does_not_stall_the_instance(
    start_service, mesh_client: Client, mesh_settings: Settings, redis_server
) -> None:
    [worker] = start_service(WORKER)
    key = Keys(mesh_settings.namespace).instance(worker.record.key)
    ttl_ms = int(mesh_settings.ttl * 1000)
    block = mesh_settings.ttl * 1.5  # longer than a record lives without a heartbeat
    inspect = redis.Redis(unix_socket_path=redis_server.socket_path, socket_timeout=2.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(mesh_client.call, "worker", "block", [block], timeout=block + 3)
            wait_until(lambda: mesh_client.call("worker", "is_blocked"), 2.0, "block() to start")
            began = time.monotonic()
            lowest_ttl = ttl_ms
            while not blocked.done():
                t = time.monotonic()
                assert mesh_client.call("worker", "ping") == "pong"
                assert time.monotonic() - t < 1.0  # answered while block() holds a thread for 3 s
                lowest_ttl = min(lowest_ttl, inspect.pttl(key))
                time.sleep(0.05)  # pacing the probe loop, not waiting for readiness
            assert time.monotonic() - began > mesh_settings.ttl  # outlived one TTL while blocked
            assert blocked.result() == worker.record.instance_id
    finally:
        inspect.close()
    # The heartbeat kept rewriting the record all along.
    assert lowest_ttl > ttl_ms - 3 * mesh_settings.heartbeat_interval * 1000, lowest_ttl
    assert [r.state for r in read_records(mesh_settings)] == ["up"]


def test_grace_period_bounds_the_stop(start_service, mesh_client: Client) -> None:
    """A handler still running when the grace period ends cannot keep the process alive."""
    [worker] = start_service(WORKER, env={"MESHKIT_DRAIN_GRACE": "1.0"})
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(mesh_client.call, "worker", "block", [8.0], timeout=10)
        wait_until(lambda: mesh_client.call("worker", "is_blocked"), 2.0, "block() to start")
        started = time.monotonic()
        code = worker.terminate(15)
        took = time.monotonic() - started
        with pytest.raises(Exception):  # noqa: B017 - lost or timed out, either way not a result
            blocked.result(10)
    assert code == 0, worker.tail()
    assert 1.0 <= took < 2.5, took
    assert "grace period ran out" in worker.tail()


def test_steady_publisher_does_not_hold_a_stopping_subscriber(start_service, mesh_client: Client) -> None:
    [echo] = start_service(ECHO)  # drain_grace is 5 s in mesh_settings
    load = Load()
    load.add("publish", lambda: mesh_client.publish("echo.events", 1))
    with load:
        load.wait_for_calls(20)
        started = time.monotonic()
        assert echo.terminate(15) == 0, echo.tail()
        took = time.monotonic() - started
    assert took < 1.5, took


def test_a_configured_port_range_is_honoured(start_service, mesh_client) -> None:
    # A wide range, so another process holding a port in it costs only a retry.
    [echo] = start_service("services.echo:Echo", env={"MESHKIT_PORT_MIN": "40000", "MESHKIT_PORT_MAX": "59999"})
    assert echo.record is not None
    port = int(echo.record.endpoint.rsplit(":", 1)[1])
    assert 40000 <= port <= 59999
    assert mesh_client.call("echo", "echo", ["in range"]) == "in range"
