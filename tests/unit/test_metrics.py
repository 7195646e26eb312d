"""Metrics against a real UDP listener on a kernel-chosen loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshkit.config import Settings
from meshkit.datagrams import pack
from meshkit.errors import ConfigError
from meshkit.metrics import Metrics, sanitize
from meshkit.testing import FakeClock

_WAIT = 0.5  # seconds to wait for a datagram that must arrive


class Listener:
    """A statsd stand-in: a UDP socket bound on 127.0.0.1 port 0."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(_WAIT)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.datagrams: list[bytes] = []

    def lines(self) -> list[str]:
        """The statsd lines of the next datagram (several if it was batched)."""
        data = self.sock.recv(65536)
        self.datagrams.append(data)
        return data.decode("ascii").split("\n")

    def nothing_pending_after_read(self, into: list[str]) -> bool:
        """Add the lines of the next datagram to ``into``; True when there was none."""
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(_WAIT)
        self.datagrams.append(data)
        into.extend(data.decode("ascii").split("\n"))
        return False

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
    metrics.flush()
    assert listener.lines() == ["mk.echo.requests:1|c"]
    metrics.incr("cache.hits", 3)
    metrics.flush()
    assert listener.lines() == ["mk.echo.cache.hits:3|c"]
    metrics.timing("work", 1.5)
    metrics.flush()
    assert listener.lines() == ["mk.echo.work:1.500000|ms"]
    metrics.gauge("queue", 7)
    metrics.flush()
    assert listener.lines() == ["mk.echo.queue:7|g"]
    metrics.gauge_delta("queue", -2)
    metrics.flush()
    assert listener.lines() == ["mk.echo.queue:-2|g"]
    metrics.gauge_delta("queue", 2)
    metrics.flush()
    assert listener.lines() == ["mk.echo.queue:+2|g"]


def test_dotted_prefix_is_kept_and_empty_prefix_is_allowed(listener: Listener) -> None:
    dotted = Metrics(listener.address, "prod.pool", "echo")
    bare = Metrics(listener.address, "", "echo")
    try:
        dotted.incr("x")
        dotted.flush()
        assert listener.lines() == ["prod.pool.echo.x:1|c"]
        bare.incr("x")
        bare.flush()
        assert listener.lines() == ["echo.x:1|c"]
    finally:
        dotted.close()
        bare.close()


def test_dynamic_parts_are_sanitised(metrics: Metrics, listener: Listener) -> None:
    metrics.call_served("get.user:v2|x", 2.0, "bad code")
    metrics.flush()
    assert sorted(listener.lines()) == sorted([
        "mk.echo.rpc.get_user_v2_x.calls:1|c",
        "mk.echo.rpc.get_user_v2_x.latency:2.000000|ms",
        "mk.echo.rpc.get_user_v2_x.errors.bad_code:1|c",
        "mk.echo.errors.bad_code:1|c",
    ])
    metrics.incr("odd name:1|c\nx")
    metrics.flush()
    assert listener.lines() == ["mk.echo.odd_name_1_c_x:1|c"]


def test_call_served_counts_errors_only_on_error(metrics: Metrics, listener: Listener) -> None:
    metrics.call_served("ping", 0.25, None)
    metrics.flush()
    assert sorted(listener.lines()) == sorted([
        "mk.echo.rpc.ping.calls:1|c",
        "mk.echo.rpc.ping.latency:0.250000|ms",
    ])
    metrics.call_served("ping", 3.0, "handler_error")
    metrics.flush()
    assert sorted(listener.lines()) == sorted([
        "mk.echo.rpc.ping.calls:1|c",
        "mk.echo.rpc.ping.latency:3.000000|ms",
        "mk.echo.rpc.ping.errors.handler_error:1|c",
        "mk.echo.errors.handler_error:1|c",
    ])


def test_call_made(metrics: Metrics, listener: Listener) -> None:
    metrics.call_made("billing", "charge", 4.0, "timeout")
    metrics.flush()
    assert sorted(listener.lines()) == sorted([
        "mk.echo.client.billing.charge.calls:1|c",
        "mk.echo.client.billing.charge.latency:4.000000|ms",
        "mk.echo.client.billing.charge.errors.timeout:1|c",
    ])


def test_publish_and_push(metrics: Metrics, listener: Listener) -> None:
    metrics.published("blocks.new", 5, 3)
    metrics.flush()
    assert sorted(listener.lines()) == sorted([
        "mk.echo.publish.blocks_new.sent:1|c",
        "mk.echo.publish.blocks_new.delivered:3|c",
        "mk.echo.publish.blocks_new.undelivered:2|c",
    ])
    metrics.push_received("blocks.new", 1.0, "handler_error")
    metrics.flush()
    assert sorted(listener.lines()) == sorted([
        "mk.echo.push.blocks_new.received:1|c",
        "mk.echo.push.blocks_new.latency:1.000000|ms",
        "mk.echo.push.blocks_new.errors.handler_error:1|c",
        "mk.echo.errors.handler_error:1|c",
    ])


def test_gauges_and_counters_of_the_framework(metrics: Metrics, listener: Listener) -> None:
    metrics.inflight(4)
    metrics.flush()
    assert listener.lines() == ["mk.echo.inflight:4|g"]
    metrics.gateway_clients(12)
    metrics.flush()
    assert listener.lines() == ["mk.echo.gateway.clients:12|g"]
    metrics.gateway_message("in")
    metrics.flush()
    assert listener.lines() == ["mk.echo.gateway.messages.in:1|c"]
    metrics.gateway_rejected("bad json")
    metrics.flush()
    assert listener.lines() == ["mk.echo.gateway.rejected.bad_json:1|c"]
    metrics.flap_stopped("echo")
    metrics.flush()
    assert listener.lines() == ["mk.echo.flap.stopped.echo:1|c"]
    metrics.registry_error()
    metrics.flush()
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
        on.flush()
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
            m.flush()
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
        metrics.flush()
        metrics.call_served("ping", 1.0, None)
        metrics.flush()
        assert metrics.dropped == 2  # one datagram per flush, each lost
    finally:
        metrics._client._sock = real  # type: ignore[union-attr]
    assert listener.nothing_pending()


def test_close_is_idempotent_and_later_calls_are_no_ops(listener: Listener) -> None:
    m = Metrics(listener.address, "mk", "echo")
    m.incr("before")
    m.flush()
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


# -- aggregation per flush interval ------------------------------------------------


def _parse(lines: list[str]) -> list[tuple[str, float, str, float]]:
    """(name, value, type, rate) of each statsd line."""
    out = []
    for line in lines:
        name, _, rest = line.partition(":")
        value, kind, *extra = rest.split("|")
        rate = float(extra[0][1:]) if extra else 1.0
        out.append((name, float(value), kind, rate))
    return out


def test_counters_are_summed_and_gauges_keep_their_last_value(metrics: Metrics, listener: Listener) -> None:
    for _ in range(1000):
        metrics.call_served("ping", 0.5, None)
    metrics.call_served("ping", 0.5, "timeout")
    for n in (3, 9, 4):
        metrics.inflight(n)
    metrics.gauge_delta("queue", 5)
    metrics.gauge_delta("queue", -7)
    metrics.gauge("level", 2)
    metrics.gauge_delta("level", -5)  # a delta after a set moves the value set
    metrics.flush()
    lines: list[str] = []
    while not listener.nothing_pending_after_read(lines):
        pass
    assert len([ln for ln in lines if ln.startswith("mk.echo.rpc.ping.latency:")]) == 128
    assert "mk.echo.rpc.ping.calls:1001|c" in lines
    assert "mk.echo.rpc.ping.errors.timeout:1|c" in lines
    assert "mk.echo.errors.timeout:1|c" in lines
    assert "mk.echo.inflight:4|g" in lines
    assert "mk.echo.queue:-2|g" in lines
    # A negative absolute value is sent as 0 then a delta: "-3|g" alone would mean "move by -3".
    assert lines.index("mk.echo.level:0|g") + 1 == lines.index("mk.echo.level:-3|g")


def test_sampled_timers_carry_a_rate_that_restores_the_true_count(metrics: Metrics,
                                                                   listener: Listener) -> None:
    for i in range(1000):
        metrics.timing("work", float(i))
    metrics.flush()
    parsed = []
    while not listener.nothing_pending_after_read(parsed):
        pass
    timers = [p for p in _parse(parsed) if p[0] == "mk.echo.work"]
    assert all(kind == "ms" for _, _, kind, _ in timers)
    assert 0 < len(timers) < 1000  # a bounded sample, not every value
    # What a statsd server counts: each line stands for 1/rate values.
    assert sum(1 / rate for *_, rate in timers) == pytest.approx(1000, rel=1e-3)
    values = sorted(v for _, v, _, _ in timers)
    assert values[0] < 250 and values[-1] > 750  # a sample of the whole range, not its head
    assert all(len(d) <= 512 for d in listener.datagrams)


def test_few_timer_values_are_sent_exactly_without_a_rate(metrics: Metrics, listener: Listener) -> None:
    metrics.timing("work", 1.5)
    metrics.timing("work", 2.5)
    metrics.flush()
    assert listener.lines() == ["mk.echo.work:1.500000|ms", "mk.echo.work:2.500000|ms"]


def test_distinct_names_are_capped_and_what_was_dropped_is_counted(listener: Listener) -> None:
    m = Metrics(listener.address, "mk", "echo", max_names=10)
    try:
        for i in range(25):
            m.call_served(f"m{i}", 1.0, None)  # two names per method
        assert m.names_dropped == 40  # 5 methods fit; the other 20 lose both figures
        m.flush()
        lines = listener.lines()
        assert len([ln for ln in lines if ln.endswith("|c") and ".rpc." in ln]) == 5
        assert "mk.echo.metrics.names_dropped:40|c" in lines
        m.call_served("m24", 1.0, None)  # a new interval has room again
        m.flush()
        assert "mk.echo.rpc.m24.calls:1|c" in listener.lines()
        assert m.names_dropped == 40
    finally:
        m.close()


def test_a_loop_timer_flushes_each_interval_and_close_flushes_the_rest(listener: Listener) -> None:
    clock = FakeClock()
    m = Metrics(listener.address, "mk", "echo", flush_interval=2.0, clock=clock)

    async def scenario() -> None:
        m.incr("a")
        m.incr("a")
        assert clock.pending == 1  # one timer for the interval, not one per figure
        clock.advance(1.9)
        assert listener.nothing_pending()
        clock.advance(0.1)
        assert listener.lines() == ["mk.echo.a:2|c"]
        assert clock.pending == 0  # idle: no timer until something is recorded
        m.incr("b")
        assert clock.pending == 1

    try:
        asyncio.run(scenario())
        m.close()  # before the interval ends: nothing counted is lost
        assert listener.lines() == ["mk.echo.b:1|c"]
        assert clock.pending == 0
    finally:
        m.close()


def test_figures_from_handler_threads_arm_the_loop_timer(listener: Listener) -> None:
    clock = FakeClock()
    m = Metrics(listener.address, "mk", "echo", flush_interval=1.0, clock=clock)

    async def scenario() -> None:
        m.incr("seen")  # the loop is learnt from the first figure recorded on it
        clock.advance(1.0)
        assert listener.lines() == ["mk.echo.seen:1|c"]
        workers = [threading.Thread(target=lambda: [m.incr("threaded") for _ in range(500)])
                   for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        deadline = time.monotonic() + 5
        while clock.pending == 0:  # the timer is armed through call_soon_threadsafe
            assert time.monotonic() < deadline, "no flush timer armed from a handler thread"
            await asyncio.sleep(0)
        assert clock.pending == 1
        clock.advance(1.0)
        assert listener.lines() == ["mk.echo.threaded:2000|c"]  # no increment lost to a race

    try:
        asyncio.run(scenario())
    finally:
        m.close()


def test_without_any_loop_a_figure_past_the_interval_flushes(listener: Listener) -> None:
    clock = FakeClock()
    m = Metrics(listener.address, "mk", "echo", flush_interval=1.0, clock=clock)
    try:
        m.incr("x")
        assert listener.nothing_pending()
        clock.advance(1.0)
        m.incr("x")
        assert listener.lines() == ["mk.echo.x:2|c"]
    finally:
        m.close()


def test_bad_flush_settings_are_config_errors() -> None:
    for interval in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="statsd_flush_interval"):
            Metrics("", "mk", "echo", flush_interval=interval)
    with pytest.raises(ConfigError, match="statsd_max_names"):
        Metrics("", "mk", "echo", max_names=0)


def test_from_settings_takes_the_flush_interval_and_name_cap(listener: Listener) -> None:
    settings = Settings(statsd_address=listener.address, statsd_flush_interval=0.25, statsd_max_names=7)
    m = Metrics.from_settings(settings, "echo")
    try:
        assert m.flush_interval == 0.25
        for i in range(8):
            m.incr(f"n{i}")
        assert m.names_dropped == 1
    finally:
        m.close()


class _Never:
    def cancel(self) -> None:
        pass


class StoppedLoopClock(FakeClock):
    """A clock whose timers never run, like ``call_later`` on a loop that stopped."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any:
        return _Never()


def test_a_timer_whose_loop_stopped_does_not_hold_figures_back(listener: Listener) -> None:
    clock = StoppedLoopClock()
    m = Metrics(listener.address, "mk", "echo", flush_interval=1.0, clock=clock)

    async def record() -> None:
        m.incr("x")  # arms a timer on this loop, which ends before it fires

    try:
        asyncio.run(record())
        clock.advance(1.5)
        m.incr("x")  # late, but within a whole interval of the due time: still the timer's job
        assert listener.nothing_pending()
        clock.advance(0.5)
        m.incr("x")
        assert listener.lines() == ["mk.echo.x:3|c"]
    finally:
        m.close()


def test_lines_are_packed_whole_into_datagrams_of_at_most_the_size() -> None:
    lines = ["a" * 10, "b" * 10, "c" * 10, "d" * 40, "e"]
    assert pack(lines, 21) == [b"a" * 10 + b"\n" + b"b" * 10, b"c" * 10, b"d" * 40, b"e"]
    assert pack([], 512) == []
