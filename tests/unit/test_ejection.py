"""Outlier ejection arithmetic (meshkit/ejection.py), driven by a fake clock and a seeded rng."""

from __future__ import annotations

import random

import pytest

from meshkit.config import Settings
from meshkit.ejection import Ejector, Health
from meshkit.errors import ConfigError
from meshkit.testing import FakeClock

TWO = ["svc:a", "svc:b"]


def ejector(**overrides: object) -> tuple[Ejector, FakeClock]:
    clock = FakeClock()
    settings = Settings.load(env={}, **({"eject_jitter": 0.0} | overrides))
    return Ejector(settings, clock=clock, rng=random.Random(7)), clock


def fail(e: Ejector, key: str = "svc:a", times: int = 1, instances: list[str] = TWO) -> list[bool]:
    return [e.failed(key, "svc", instances) for _ in range(times)]


def test_seventh_failure_in_a_row_ejects() -> None:
    e, _ = ejector()
    assert fail(e, times=6) == [False] * 6
    assert e.allows("svc:a")
    assert e.failed("svc:a", "svc", TWO)
    assert not e.allows("svc:a")
    assert e.health("svc:a") == Health.EJECTED
    assert e.allows("svc:b")
    assert e.ejected("svc") == 1 and e.ejections_total == 1


def test_a_success_resets_the_count() -> None:
    e, _ = ejector()
    fail(e, times=6)
    e.succeeded("svc:a")
    assert fail(e, times=6) == [False] * 6
    assert e.allows("svc:a")
    assert e.snapshot()[0].failures == 6


def test_probe_one_request_then_full_traffic() -> None:
    e, clock = ejector()
    fail(e, times=7)
    clock.advance(0.99)
    assert not e.allows("svc:a")
    clock.advance(0.02)
    assert e.health("svc:a") == Health.PROBING
    assert e.allows("svc:a")
    e.sent("svc:a")  # the probe
    assert not e.allows("svc:a"), "a second request while the probe is out"
    e.succeeded("svc:a")
    assert e.health("svc:a") == Health.HEALTHY
    assert e.allows("svc:a")
    e.sent("svc:a")
    assert e.allows("svc:a"), "full traffic again"


def test_a_failed_probe_ejects_again_for_twice_as_long_up_to_the_max() -> None:
    e, clock = ejector(eject_max_time=5.0)
    fail(e, times=7)
    spans = []
    for _ in range(5):
        spans.append(e.snapshot()[0].ejected_for)
        clock.advance(spans[-1] + 0.001)
        assert e.allows("svc:a")
        e.sent("svc:a")
        assert e.failed("svc:a", "svc", TWO), "one failed probe is enough"
    assert spans == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])


def test_jitter_stays_within_its_band() -> None:
    e, _ = ejector(eject_jitter=0.2)
    spans = []
    for _ in range(50):
        fail(e, times=7)
        spans.append(e.snapshot()[0].ejected_for)
        e.forget([])  # start again from the base time
    assert all(0.8 <= s <= 1.2 for s in spans)
    assert max(spans) - min(spans) > 0.1, "the draws differ"


def test_a_lost_probe_waiter_does_not_block_the_instance_for_ever() -> None:
    e, clock = ejector()
    fail(e, times=7)
    clock.advance(1.01)
    e.sent("svc:a")
    assert not e.allows("svc:a")
    clock.advance(1.0)
    assert e.allows("svc:a"), "another probe after eject_base_time"


def test_healthy_for_the_max_time_starts_again_from_the_base() -> None:
    e, clock = ejector(eject_max_time=10.0)
    fail(e, times=7)
    clock.advance(1.01)
    e.succeeded("svc:a")
    fail(e, times=7)
    assert e.snapshot()[0].ejected_for == pytest.approx(2.0), "soon after: longer"
    clock.advance(2.01)
    e.succeeded("svc:a")
    clock.advance(10.0)
    e.succeeded("svc:a")
    assert e.snapshot() == []
    fail(e, times=7)
    assert e.snapshot()[0].ejected_for == pytest.approx(1.0)


def test_late_answers_while_ejected_change_nothing() -> None:
    e, _ = ejector()
    fail(e, times=7)
    e.succeeded("svc:a")  # sent before the ejection
    assert not e.failed("svc:a", "svc", TWO)
    assert e.health("svc:a") == Health.EJECTED


def test_never_more_than_the_share_and_never_the_only_instance() -> None:
    e, _ = ejector(eject_max_share=0.5)
    four = ["svc:a", "svc:b", "svc:c", "svc:d"]
    assert fail(e, "svc:a", 7, four)[-1]
    assert fail(e, "svc:b", 7, four)[-1]
    assert fail(e, "svc:c", 7, four) == [False] * 7, "half are out already"
    assert e.allows("svc:c")
    e2, _ = ejector(eject_max_share=0.1)
    assert fail(e2, "svc:a", 7, four)[-1], "at least one may be ejected"
    assert not fail(e2, "svc:b", 7, four)[-1]
    e3, _ = ejector()
    assert fail(e3, "svc:a", 20, ["svc:a"]) == [False] * 20, "the only instance stays in choice"


def test_disabled_and_forgotten() -> None:
    e, _ = ejector(eject_after_failures=0)
    assert fail(e, times=50) == [False] * 50 and e.allows("svc:a")
    e, _ = ejector()
    fail(e, times=7)
    e.forget(["svc:b"])
    assert e.allows("svc:a") and e.snapshot() == []


def test_codes_and_settings_checked() -> None:
    e, _ = ejector(eject_codes="handler_error, overloaded,")
    assert e.codes == {"handler_error", "overloaded"}
    for bad in ({"eject_after_failures": -1}, {"eject_max_share": 1.5}, {"eject_base_time": 0},
                {"eject_base_time": 9.0, "eject_max_time": 2.0}, {"retry_ratio": -0.1}):
        with pytest.raises(ConfigError):
            Settings.load(env={}, **bad)
