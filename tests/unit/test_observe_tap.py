"""Taps: filters, the source-side rate limit, self-closing (a fake clock, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from meshkit.observe.tap import IDLE_CLOSE_S, QUEUE_EVENTS, TapError, TapFilter, TapSet


class Now:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def offer(taps: TapSet, method: str = "m", meta: dict[str, str] | None = None, status: str = "ok",
          us: int = 10, args: Any = None) -> None:
    taps.offer("svc", method, meta or {}, status, us, lambda: {"name": method, "start_unix_us": 0}, args)


def test_filter_parse_refuses_bad_input() -> None:
    for bad in ([], {"nope": 1}, {"where": {"a": 1}}, {"method": 3}, {"min_latency_ms": -1}):
        with pytest.raises(TapError):
            TapFilter.parse(bad)
    f = TapFilter.parse({"method": "m", "where": {"customer": "c1"}, "errors_only": True, "min_latency_ms": 1})
    assert f.matches("svc", "m", {"customer": "c1"}, "boom", 2000)
    assert not f.matches("svc", "m", {"customer": "c2"}, "boom", 2000)
    assert not f.matches("svc", "m", {"customer": "c1"}, "ok", 2000)
    assert not f.matches("svc", "m", {"customer": "c1"}, "boom", 10)


def test_rate_limit_at_the_source_and_hidden_metadata() -> None:
    now = Now()
    taps = TapSet(2, frozenset({"password"}), now)
    tap_id = taps.open({"where": {"customer": "c1"}}, max_rps=5)
    for _ in range(100):
        offer(taps, meta={"customer": "c1", "password": "hunter2"}, args=["x" * 1000])
    offer(taps, meta={"customer": "c2"})
    got = taps.poll(tap_id)
    assert len(got["events"]) == 5 and got["dropped"] == 95 and not got["closed"]
    event = got["events"][0]
    assert event["meta"] == {"customer": "c1"} and len(event["args"]) < 300
    now.t += 1.0  # one second refills the bucket
    for _ in range(100):
        offer(taps, meta={"customer": "c1"})
    assert len(taps.poll(tap_id, got["next"])["events"]) == 5


def test_tap_closes_after_its_count_its_time_and_when_not_polled() -> None:
    now = Now()
    taps = TapSet(3, frozenset(), now)
    by_count = taps.open(None, max_rps=1000, max_events=3)
    by_time = taps.open(None, ttl_s=2)
    idle = taps.open(None)
    for _ in range(10):
        offer(taps)
    got = taps.poll(by_count)
    assert len(got["events"]) == 3 and got["closed"]
    assert taps.poll(by_count)["closed"]  # remembered as closed, not unknown
    now.t += 2.5
    assert taps.poll(by_time)["closed"]
    now.t += IDLE_CLOSE_S + 1
    offer(taps)
    taps.sweep()
    assert idle not in taps.taps and not taps


def test_bounded_taps_queue_and_limits() -> None:
    now = Now()
    taps = TapSet(1, frozenset(), now)
    tap_id = taps.open(None, max_rps=1000, max_events=100_000)
    with pytest.raises(TapError):
        taps.open(None)
    for _ in range(QUEUE_EVENTS * 3):  # within the first second's tokens
        offer(taps)
    assert len(taps.poll(tap_id)["events"]) == QUEUE_EVENTS
    for bad in ({"max_rps": 0}, {"max_rps": 10**6}, {"ttl_s": True}, {"max_events": -1}):
        with pytest.raises(TapError):
            taps.open(None, **bad)
    with pytest.raises(TapError):
        taps.poll("unknown")
    assert taps.close(tap_id) and not taps.close(tap_id)
