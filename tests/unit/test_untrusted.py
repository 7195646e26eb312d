"""Echoing remote values: clip never raises and bounds its output; the log throttle."""

from __future__ import annotations

import logging

import pytest

from meshkit.untrusted import CLIP_LIMIT, LogThrottle, clip


def test_clip_keeps_short_strings() -> None:
    assert clip("ping") == "ping"


def test_clip_cuts_long_strings_and_says_how_much() -> None:
    out = clip("x" * (4 * 1024 * 1024))
    assert len(out) < CLIP_LIMIT + 30
    assert out.endswith(f"…(+{4 * 1024 * 1024 - CLIP_LIMIT} chars)")


def test_clip_survives_deep_nesting_and_bad_repr() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert len(clip(deep)) <= CLIP_LIMIT + 30
    assert "Hostile" in clip(Hostile())
    assert len(clip(b"\x00" * 10_000_000)) <= CLIP_LIMIT + 30


def test_throttle_writes_once_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("t"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        assert throttle.log("full", logging.WARNING, "queue full")
        for _ in range(10_000):
            throttle.log("full", logging.WARNING, "queue full")
        assert throttle.suppressed("full") == 10_000
        now[0] = 10.5
        assert throttle.log("full", logging.WARNING, "queue full")
    assert len(caplog.records) == 2
    assert caplog.records[1].__dict__["suppressed"] == 10_000


def test_throttle_memory_is_bounded() -> None:
    throttle = LogThrottle(logging.getLogger("t"), 10.0, clock=lambda: 0.0, max_causes=4)
    for i in range(1000):
        throttle.log(f"c{i}", logging.DEBUG, "x")
    # The last four causes are remembered (their repeats are suppressed) ...
    assert [throttle.log(f"c{i}", logging.DEBUG, "x") for i in range(996, 1000)] == [False] * 4
    assert [throttle.suppressed(f"c{i}") for i in range(996, 1000)] == [1] * 4
    # ... and the fifth-last is forgotten: it logs again, as a new cause.
    assert throttle.suppressed("c995") == 0 and throttle.log("c995", logging.DEBUG, "x")
