"""Metrics against a real UDP listener on a kernel-chosen loopback port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.metrics import Metrics, sanitize

_WAIT = 0.5  # seconds to wait for a datagram that must arrive


class Listener:
    """A statsd stand-in: a UDP socket bound on 127.0.0.1 port 0."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(_WAIT)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def lines(self) -> list[str]:
        """The statsd lines of the next datagram (several if it was batched)."""
        data = self.sock.recv(65536)
        return data.decode("ascii").split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(_WAIT)
        return False


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    try:
        yield lst
    finally:
        lst.sock.close()


@pytest.fixture
def metrics(listener: Listener) -> Iterator[Metrics]:
    m = Metrics(listener.address, "mk", "echo")
    try:
        yield m
    finally:
        m.close()


def test_sanitize_replaces_everything_outside_the_safe_set() -> None:
    assert sanitize("get_user-v2") == "get_user-v2"
    assert sanitize("a.b:c|d@e f\nü") == "a_b_c_d_e_f__"
    assert sanitize("") == "_"


def test_names_carry_prefix_and_service(metrics: Metrics, listener: Listener) -> None:
    metrics.incr("requests")
    assert listener.lines() == ["mk.echo.requests:1|c"]
    metrics.incr("cache.hits", 3)
    assert listener.lines() == ["mk.echo.cache.hits:3|c"]
    metrics.timing("work", 1.5)
    assert listener.lines() == ["mk.echo.work:1.500000|ms"]
    metrics.gauge("queue", 7)
    assert listener.lines() == ["mk.echo.queue:7|g"]
    metrics.gauge_delta("queue", -2)
    assert listener.lines() == ["mk.echo.queue:-2|g"]
    metrics.gauge_delta("queue", 2)
    assert listener.lines() == ["mk.echo.queue:+2|g"]


def test_dotted_prefix_is_kept_and_empty_prefix_is_allowed(listener: Listener) -> None:
    dotted = Metrics(listener.address, "prod.pool", "echo")
    bare = Metrics(listener.address, "", "echo")
    try:
        dotted.incr("x")
        assert listener.lines() == ["prod.pool.echo.x:1|c"]
        bare.incr("x")
        assert listener.lines() == ["echo.x:1|c"]
    finally:
        dotted.close()
        bare.close()


def test_dynamic_parts_are_sanitised(metrics: Metrics, listener: Listener) -> None:
    metrics.call_served("get.user:v2|x", 2.0, "bad code")
    assert listener.lines() == [
        "mk.echo.rpc.get_user_v2_x.calls:1|c",
        "mk.echo.rpc.get_user_v2_x.latency:2.000000|ms",
        "mk.echo.rpc.get_user_v2_x.errors.bad_code:1|c",
        "mk.echo.errors.bad_code:1|c",
    ]
    metrics.incr("odd name:1|c\nx")
    assert listener.lines() == ["mk.echo.odd_name_1_c_x:1|c"]


def test_call_served_counts_errors_only_on_error(metrics: Metrics, listener: Listener) -> None:
    metrics.call_served("ping", 0.25, None)
    assert listener.lines() == [
        "mk.echo.rpc.ping.calls:1|c",
        "mk.echo.rpc.ping.latency:0.250000|ms",
    ]
    metrics.call_served("ping", 3.0, "handler_error")
    assert listener.lines() == [
        "mk.echo.rpc.ping.calls:1|c",
        "mk.echo.rpc.ping.latency:3.000000|ms",
        "mk.echo.rpc.ping.errors.handler_error:1|c",
        "mk.echo.errors.handler_error:1|c",
    ]


def test_call_made(metrics: Metrics, listener: Listener) -> None:
    metrics.call_made("billing", "charge", 4.0, "timeout")
    assert listener.lines() == [
        "mk.echo.client.billing.charge.calls:1|c",
        "mk.echo.client.billing.charge.latency:4.000000|ms",
        "mk.echo.client.billing.charge.errors.timeout:1|c",
    ]


def test_publish_and_push(metrics: Metrics, listener: Listener) -> None:
    metrics.published("blocks.new", 5, 3)
    assert listener.lines() == [
        "mk.echo.publish.blocks_new.sent:1|c",
        "mk.echo.publish.blocks_new.delivered:3|c",
        "mk.echo.publish.blocks_new.undelivered:2|c",
    ]
    metrics.push_received("blocks.new", 1.0, "handler_error")
    assert listener.lines() == [
        "mk.echo.push.blocks_new.received:1|c",
        "mk.echo.push.blocks_new.latency:1.000000|ms",
        "mk.echo.push.blocks_new.errors.handler_error:1|c",
        "mk.echo.errors.handler_error:1|c",
    ]


def test_gauges_and_counters_of_the_framework(metrics: Metrics, listener: Listener) -> None:
    metrics.inflight(4)
    assert listener.lines() == ["mk.echo.inflight:4|g"]
    metrics.gateway_clients(12)
    assert listener.lines() == ["mk.echo.gateway.clients:12|g"]
    metrics.gateway_message("in")
    assert listener.lines() == ["mk.echo.gateway.messages.in:1|c"]
    metrics.gateway_rejected("bad json")
    assert listener.lines() == ["mk.echo.gateway.rejected.bad_json:1|c"]
    metrics.flap_stopped("echo")
    assert listener.lines() == ["mk.echo.flap.stopped.echo:1|c"]
    metrics.registry_error()
    assert listener.lines() == ["mk.echo.registry.errors:1|c"]


def test_disabled_metrics_create_no_socket_and_do_nothing() -> None:
    m = Metrics("", "mk", "echo")
    assert not m.enabled
    m.incr("x")
    m.timing("x", 1.0)
    m.gauge("x", 1)
    m.gauge_delta("x", 1)
    m.call_served("ping", 1.0, "timeout")
    m.call_made("a", "b", 1.0, None)
    m.published("t", 2, 1)
    m.push_received("t", 1.0, None)
    m.inflight(1)
    m.gateway_clients(1)
    m.gateway_message("out")
    m.gateway_rejected("r")
    m.flap_stopped("w")
    m.registry_error()
    m.close()
    assert m.dropped == 0


def test_from_settings_applies_service_overrides(listener: Listener) -> None:
    settings = Settings(
        statsd_address="",
        statsd_prefix="mk",
        service_overrides={"echo": {"statsd_address": listener.address}},
    )
    off = Metrics.from_settings(settings, "other")
    on = Metrics.from_settings(settings, "echo")
    try:
        assert not off.enabled
        on.incr("x")
        assert listener.lines() == ["mk.echo.x:1|c"]
    finally:
        on.close()
        off.close()


def test_malformed_address_is_a_config_error() -> None:
    for bad in ("localhost", "localhost:", ":8125", "host:port", "host:70000"):
        with pytest.raises(ConfigError):
            Metrics(bad, "mk", "echo")


def test_refused_port_never_raises_and_counts_drops() -> None:
    # The port stays ours for the whole test, so nobody else can take it; but
    # the socket holding it is connected elsewhere, so the kernel delivers
    # nothing from the metrics socket to it and answers "port unreachable".
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    holder.connect(("127.0.0.1", 9))
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    m = Metrics(address, "mk", "echo")
    try:
        # The kernel reports the refusal on the send after the ICMP comes back;
        # on loopback that is the next one, so a handful of sends is plenty.
        for _ in range(100):
            m.call_served("ping", 1.0, "timeout")
            if m.dropped:
                break
        assert m.dropped > 0
    finally:
        m.close()
        holder.close()


def test_full_buffer_is_a_drop_not_a_block(metrics: Metrics, listener: Listener) -> None:
    class FullSocket:
        def send(self, data: bytes) -> int:
            raise BlockingIOError(11, "Resource temporarily unavailable")

        def close(self) -> None:
            pass

    real = metrics._client._sock  # type: ignore[union-attr]
    metrics._client._sock = FullSocket()  # type: ignore[union-attr]
    try:
        metrics.incr("x")
        metrics.call_served("ping", 1.0, None)
        assert metrics.dropped == 2
    finally:
        metrics._client._sock = real  # type: ignore[union-attr]
    assert listener.nothing_pending()


def test_close_is_idempotent_and_later_calls_are_no_ops(listener: Listener) -> None:
    m = Metrics(listener.address, "mk", "echo")
    m.incr("before")
    assert listener.lines() == ["mk.echo.before:1|c"]
    m.close()
    m.close()
    assert not m.enabled
    m.incr("after")
    assert listener.nothing_pending()


def test_name_cache_stays_bounded(metrics: Metrics) -> None:
    for i in range(5000):
        metrics.name("rpc", f"m{i}", "calls")
    assert len(metrics._names) <= 2048
    assert metrics.name("rpc", "m1", "calls") == "mk.echo.rpc.m1.calls"
