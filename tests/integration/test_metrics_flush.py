"""Aggregated statsd metrics from a real service process: nothing counted is lost.

The flush interval is set far longer than the test, so every figure that
reaches the listener was sent by the flush a graceful stop makes; the sums
must be exact.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from meshkit.blocking import Client
from meshkit.testing import StartService

pytestmark = pytest.mark.integration

_CALLS = 300


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def read_lines(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Statsd lines read from ``sock`` until one starts with ``until`` and the socket is quiet."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if any(line.startswith(until) for line in lines):
                return lines  # the stop's flush arrived and nothing followed it for 0.2 s
            continue
        lines.extend(data.decode("ascii").splitlines())
    raise AssertionError(f"no {until!r} line within {timeout} s; got {lines[:20]}")


def test_a_graceful_stop_flushes_exact_counts_and_sampled_timers(
        start_service: StartService, mesh_client: Client, statsd: socket.socket) -> None:
    port = statsd.getsockname()[1]
    [echo] = start_service("services.echo:Echo", env={
        "MESHKIT_STATSD_ADDRESS": f"127.0.0.1:{port}", "MESHKIT_STATSD_PREFIX": "t",
        "MESHKIT_STATSD_FLUSH_INTERVAL": "600"})
    for i in range(_CALLS):
        assert mesh_client.call("echo", "echo", [i]) == i
    statsd.settimeout(0.5)
    with pytest.raises(TimeoutError):
        statsd.recv(65536)  # within the interval nothing is sent per call
    statsd.settimeout(0.2)
    assert echo.terminate() == 0
    lines = read_lines(statsd, "t.echo.rpc.echo.calls:", timeout=10)
    calls = sum(int(line.split(":")[1].split("|")[0]) for line in lines
                if line.startswith("t.echo.rpc.echo.calls:"))
    assert calls == _CALLS
    timers = [line.split("|") for line in lines if line.startswith("t.echo.rpc.echo.latency:")]
    assert timers and all(parts[1] == "ms" for parts in timers)
    counted = sum(1 / float(parts[2][1:]) if len(parts) > 2 else 1.0 for parts in timers)
    assert counted == pytest.approx(_CALLS, rel=1e-3)  # what a statsd server counts
    assert len(timers) < _CALLS  # a bounded sample was sent, not every value
