"""Flap control: the restart-intensity rule and the guard's reaction, with time passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.metrics import Metrics
from meshkit.stack.control import CircusControl, StackError
from meshkit.stack.flap import FlapGuard, FlapLimit, FlapPolicy, read_flapped, watcher_event


def test_trips_after_more_than_max_abnormal_exits_within_window() -> None:
    policy = FlapPolicy(FlapLimit(max_restarts=3, window=10.0))
    assert [policy.record_exit("w", 1, t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert policy.record_exit("w", 1, 3.0) is True
    # Tripping clears the history: the next exit starts a fresh count.
    assert policy.record_exit("w", 1, 4.0) is False


def test_exits_outside_the_window_do_not_count() -> None:
    policy = FlapPolicy(FlapLimit(max_restarts=2, window=5.0))
    for t in (0.0, 6.0, 12.0, 18.0):
        assert policy.record_exit("w", 1, t) is False


def test_clean_exits_never_count() -> None:
    policy = FlapPolicy(FlapLimit(max_restarts=1, window=100.0))
    assert not any(policy.record_exit("w", 0, float(t)) for t in range(10))


def test_watchers_are_counted_separately_and_limits_are_per_watcher() -> None:
    policy = FlapPolicy(FlapLimit(1, 10.0), {"slow": FlapLimit(5, 10.0)})
    assert policy.record_exit("a", 1, 0.0) is False
    assert policy.record_exit("slow", 1, 0.0) is False
    assert policy.record_exit("a", 1, 1.0) is True
    assert policy.record_exit("slow", 1, 1.0) is False


def test_reset_gives_a_fresh_budget() -> None:
    policy = FlapPolicy(FlapLimit(1, 10.0))
    policy.record_exit("w", 1, 0.0)
    policy.reset("w")
    assert policy.record_exit("w", 1, 1.0) is False


def test_limits_from_settings_service_tables() -> None:
    settings = Settings.load(env={}, service_overrides={"shares": {"flap_max_restarts": 2, "flap_window": 3}})
    policy = FlapPolicy.from_settings(settings, FlapLimit(7, 30.0))
    assert policy.limit("shares") == FlapLimit(2, 3.0)
    assert policy.limit("other") == FlapLimit(7, 30.0)


class FakeControl(CircusControl):
    def __init__(self, fail: bool = False) -> None:
        super().__init__("ipc:///nonexistent")
        self.stopped: list[str] = []
        self.fail = fail

    def stop(self, watcher: str) -> None:
        if self.fail:
            raise StackError("circusd did not answer")
        self.stopped.append(watcher)


def _guard(tmp_path: Path, control: CircusControl, metrics: Any = None) -> FlapGuard:
    return FlapGuard(control, "ipc:///unused", FlapPolicy(FlapLimit(2, 10.0)), str(tmp_path),
                     metrics or Metrics("", "", "flapguard"), clock=iter(range(100)).__next__)


def test_guard_stops_a_tripped_watcher_and_records_it(tmp_path: Path) -> None:
    control = FakeControl()
    guard = _guard(tmp_path, control)
    for _ in range(3):
        guard.handle_event("watcher.crasher.reap", {"exit_code": 1, "process_pid": 1})
    assert control.stopped == ["crasher"]
    assert set(read_flapped(str(tmp_path))) == {"crasher"}
    # Starting it again by hand clears the record and the count.
    guard.handle_event("watcher.crasher.start", {})
    assert read_flapped(str(tmp_path)) == {}
    guard.handle_event("watcher.crasher.reap", {"exit_code": 1})
    assert control.stopped == ["crasher"]


def test_guard_ignores_clean_exits_other_events_and_itself(tmp_path: Path) -> None:
    control = FakeControl()
    guard = _guard(tmp_path, control)
    for _ in range(5):
        guard.handle_event("watcher.shares.reap", {"exit_code": 0})
        guard.handle_event("watcher.shares.spawn", {})
        guard.handle_event("watcher.flapguard.reap", {"exit_code": 1})
        guard.handle_event("garbage", {})
    assert control.stopped == []


def test_guard_survives_a_failed_stop(tmp_path: Path) -> None:
    guard = _guard(tmp_path, FakeControl(fail=True))
    for _ in range(3):
        guard.handle_event("watcher.crasher.reap", {"exit_code": 1})
    assert read_flapped(str(tmp_path)) == {}


@pytest.mark.parametrize("table", [{"flap_max_restarts": "lots"}, {"flap_window": [1]},
                                   {"flap_max_restarts": -1}, {"flap_window": 0}])
def test_bad_limits_in_a_service_table_are_config_errors(table: dict[str, object]) -> None:
    settings = Settings.load(env={}, service_overrides={"shares": table})
    with pytest.raises(ConfigError, match="flap"):
        FlapPolicy.from_settings(settings)


def test_limits_from_the_environment_seen_by_settings_load() -> None:
    settings = Settings.load(env={"MESHKIT_SHARES_FLAP_WINDOW": "4.5"},
                             service_overrides={"shares": {"flap_max_restarts": 2}})
    assert FlapPolicy.from_settings(settings).limit("shares") == FlapLimit(2, 4.5)


@pytest.mark.parametrize(("frames", "event"), [
    ([b"watcher.shares.reap", b'{"exit_code": 1}'], ("watcher.shares.reap", {"exit_code": 1})),
    ([b"watcher.shares.spawn", b"[1, 2]"], ("watcher.shares.spawn", {})),  # JSON, not an object
    ([b"watcher.\xff", b"{}"], ("watcher.\ufffd", {})),
    ([b"watcher.shares.reap", b"{not json"], None),
    ([b"watcher.shares.reap"], None),
    ([b"a", b"{}", b"{}"], None),
])
def test_a_circus_message_is_read_as_topic_and_event_or_skipped(
        frames: list[bytes], event: tuple[str, dict[str, Any]] | None) -> None:
    assert watcher_event(frames) == event
