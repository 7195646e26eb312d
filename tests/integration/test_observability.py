"""statsd metrics from running services, caught by a real UDP listener, and JSON
logs that let one request be followed across processes by its trace id."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkit import BadArgumentsError
from meshkit.blocking import Client
from meshkit.testing import StartService

pytestmark = pytest.mark.integration


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def received_names(sock: socket.socket, wanted: set[str], timeout: float) -> set[str]:
    """Metric names read from ``sock`` until all of ``wanted`` arrived or ``timeout`` passed."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not wanted <= seen and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        for line in data.decode().splitlines():
            seen.add(line.split(":", 1)[0])
    return seen


def test_services_send_statsd_metrics(start_service: StartService, mesh_client: Client,
                                      statsd: socket.socket) -> None:
    port = statsd.getsockname()[1]
    start_service("services.echo:Echo",
                  env={"MESHKIT_STATSD_ADDRESS": f"127.0.0.1:{port}", "MESHKIT_STATSD_PREFIX": "t"})
    for i in range(5):
        assert mesh_client.call("echo", "echo", [i]) == i
    with pytest.raises(BadArgumentsError):
        mesh_client.call("echo", "echo", [1, 2])
    assert mesh_client.publish("echo.events", {"n": 1}) == 1
    wanted = {
        "t.echo.rpc.echo.calls",
        "t.echo.rpc.echo.latency",
        "t.echo.rpc.echo.errors.bad_arguments",
        "t.echo.errors.bad_arguments",
        "t.echo.inflight",
        "t.echo.push.echo_events.received",
    }
    seen = received_names(statsd, wanted, timeout=5)
    assert wanted <= seen, f"missing {wanted - seen}"


def test_one_request_can_be_followed_across_processes_by_trace_id(
        start_service: StartService, mesh_client: Client) -> None:
    [a] = start_service("tests.integration.services.hops:HopA")
    [b] = start_service("tests.integration.services.hops:HopB")
    assert mesh_client.call("hop-a", "begin", ["order-17"]) == "done:order-17"

    def line_for(log_path: str, event: str) -> dict[str, object]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for raw in Path(log_path).read_text().splitlines():
                if raw.startswith("{"):
                    record = json.loads(raw)
                    if record.get("event") == event and record.get("order") == "order-17":
                        return dict(record)
            time.sleep(0.05)  # the child writes its log line asynchronously; poll the file
        raise AssertionError(f"no {event!r} line in {log_path}")

    first = line_for(a.log_path, "order received")
    second = line_for(b.log_path, "order finished")
    assert first["service"] == "hop-a" and second["service"] == "hop-b"
    assert first["level"] == second["level"] == "INFO"
    assert isinstance(first["trace_id"], str) and len(first["trace_id"]) == 32
    assert first["trace_id"] == second["trace_id"]
    assert first["span_id"] != second["span_id"]
    assert first["instance"] != second["instance"]
