"""Retry budget arithmetic (meshkit/retrybudget.py), driven by a fake clock."""

from __future__ import annotations

from meshkit.config import Settings
from meshkit.retrybudget import RetryBudget
from meshkit.testing import FakeClock


def budget(**overrides: object) -> tuple[RetryBudget, FakeClock]:
    clock = FakeClock()
    return RetryBudget(Settings.load(env={}, **overrides), clock=clock), clock


def retries(b: RetryBudget, tries: int) -> int:
    return sum(b.allows() for _ in range(tries))


def test_the_floor_alone_when_no_calls_were_made() -> None:
    b, _ = budget(retry_min_per_second=2.0, retry_window=10.0)
    assert retries(b, 50) == 20
    assert b.retried == 20 and b.refused == 30


def test_twenty_percent_of_recent_calls_on_top_of_the_floor() -> None:
    b, _ = budget(retry_ratio=0.2, retry_min_per_second=0.0)
    for _ in range(1000):
        b.called()
    assert retries(b, 1000) == 200
    assert b.available == 0


def test_a_failing_service_under_steady_load_gets_no_storm() -> None:
    # 100 calls a second for a minute, each wanting 3 retries: at most 20% + floor extra.
    b, clock = budget(retry_ratio=0.2, retry_min_per_second=1.0, retry_window=10.0)
    allowed = 0
    for _ in range(60):
        for _ in range(100):
            b.called()
            allowed += retries(b, 3)
        clock.advance(1.0)
    assert allowed <= 0.2 * 6000 + 60 + 10
    assert allowed >= 0.2 * 6000


def test_the_window_slides() -> None:
    b, clock = budget(retry_ratio=0.0, retry_min_per_second=1.0, retry_window=3.0)
    assert retries(b, 10) == 3
    clock.advance(1.0)
    assert retries(b, 10) == 0, "the retries of the last 3 s still count"
    clock.advance(2.0)
    assert retries(b, 10) == 3, "the first second's retries have left the window"
    clock.advance(100.0)
    assert b.available == 3


def test_calls_leave_the_window_too() -> None:
    b, clock = budget(retry_ratio=0.5, retry_min_per_second=0.0, retry_window=2.0)
    for _ in range(10):
        b.called()
    clock.advance(2.0)
    assert retries(b, 10) == 0
