"""What the panel shows of Circus: restarts counted from events, watchers, flap-control stops."""

from __future__ import annotations

import json
import os
from pathlib import Path

from meshkit.panel.circus import CircusView, RestartCounter
from meshkit.stack.control import StackError


class FakeControl:
    def __init__(self) -> None:
        self.statuses = {"mining": "active", "jobs": "stopped", "gateway": "active"}
        self.fail = False

    def status(self) -> dict[str, str]:
        if self.fail:
            raise StackError("circusd at ipc://x did not answer 'status'")
        return dict(self.statuses)

    def pids(self, watcher: str) -> list[int]:
        return [os.getpid()] if watcher == "mining" else []

    def numprocesses(self, watcher: str) -> int:
        return {"mining": 1, "jobs": 1, "gateway": 0}[watcher]


def test_exits_are_counted_per_watcher_and_abnormal_ones_apart() -> None:
    counter = RestartCounter(clock=lambda: 50.0)
    counter.handle("watcher.mining.reap", {"exit_code": 1})
    counter.handle("watcher.mining.reap", {"exit_code": 0})
    counter.handle("watcher.mining.spawn", {})
    counter.handle("watcher.my.dotted.reap", {"exit_code": "x"})
    counter.handle("arbiter.reap", {})
    assert (counter.of("mining").exits, counter.of("mining").abnormal, counter.of("mining").last_code) == (2, 1, 0)
    assert counter.of("my.dotted").abnormal == 1  # an unknown code counts as abnormal
    assert counter.of("never").exits == 0
    assert set(counter.watchers) == {"mining", "my.dotted"}


def test_the_view_joins_status_processes_restarts_and_flap_stops(tmp_path: Path) -> None:
    (tmp_path / "circus.sock").touch()
    (tmp_path / "flapped.json").write_text(json.dumps({"jobs": {"at": 10.0, "exits": 6, "window": 10.0}}))
    counter = RestartCounter(clock=lambda: 99.0)
    counter.handle("watcher.mining.reap", {"exit_code": -9})
    view = CircusView(FakeControl(), str(tmp_path), counter)
    watchers = {w["name"]: w for w in view.read()["watchers"]}
    assert list(watchers) == ["gateway", "jobs", "mining"]
    mining = watchers["mining"]
    assert [p["pid"] for p in mining["processes"]] == [os.getpid()]
    assert mining["processes"][0]["age_s"] >= 0
    assert (mining["restarts"], mining["abnormal_exits"], mining["last_exit_code"]) == (1, 1, -9)
    assert watchers["jobs"]["status"] == "stopped (flapping)"
    assert watchers["jobs"]["flapped"] == {"at": 10.0, "exits": 6, "window": 10.0}
    assert watchers["gateway"]["flapped"] is None


def test_circusd_not_answering_is_shown_not_raised(tmp_path: Path) -> None:
    control = FakeControl()
    view = CircusView(control, str(tmp_path), RestartCounter())
    assert "no circusd runs from" in view.read()["error"]
    (tmp_path / "circus.sock").touch()
    control.fail = True
    assert "did not answer" in view.read()["error"]
