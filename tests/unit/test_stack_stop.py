"""How a stack stops and restarts, without Circus: the stop order, the rolling restart against a
stand-in control, output that cannot fail, and what a failed circusd start logged."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from meshkit.stack.circusd import SkippedCheckFilter, startup_failure
from meshkit.stack.console import say
from meshkit.stack.control import CircusControl, StackError
from meshkit.stack.order import SERVICES, stop_plan
from meshkit.stack.rolling import RestartFailed, RollingRestart

STATUSES = {"redis": "active", "flapguard": "active", "haproxy": "active", "gateway": "active",
            "shares": "active", "jobs": "active", "crasher": "stopped", "plugin:statsd": "active",
            "circusd-stats": "active"}
PRIORITIES = {"redis": 100, "flapguard": 90, "haproxy": 80, "gateway": 50, "shares": 40, "jobs": 40}


def test_the_public_side_stops_first_redis_last_and_the_rest_in_reverse_start_order() -> None:
    extra = {**STATUSES, "mine": "active"}
    plan = stop_plan(extra, {**PRIORITIES, "mine": 45})
    assert plan == ["flapguard", "gateway", "haproxy", "jobs", "shares", "mine", "redis"]


def test_stopped_watchers_and_circus_helpers_are_left_out() -> None:
    plan = stop_plan({**STATUSES, "redis": "stopped"}, PRIORITIES)
    assert "redis" not in plan and "crasher" not in plan
    assert not any(w.startswith("plugin:") or w == "circusd-stats" for w in plan)


def test_one_more_watcher_is_placed_by_one_entry_in_the_table() -> None:
    order = ("flapguard", "gateway", "haproxy", "haproxy-sync", SERVICES, "redis")
    plan = stop_plan({**STATUSES, "haproxy-sync": "active"}, PRIORITIES, order)
    assert plan[:4] == ["flapguard", "gateway", "haproxy", "haproxy-sync"] and plan[-1] == "redis"


class FakeCircus(CircusControl):
    """A watcher in memory: ``incr`` starts pids; ``decr`` lowers the number of processes and stops
    the oldest of those beyond it, as Circus's ``manage_processes`` does (dead ones are gone already)."""

    def __init__(self, pids: list[int], fail_pid: int | None = None) -> None:
        super().__init__("ipc:///nowhere")
        self.processes = list(pids)  # oldest first
        self.numprocesses = len(pids)
        self.next_pid = 1000
        self.fail_pid = fail_pid  # this new pid exits at once
        self.events: list[str] = []
        self.up: set[int] = set(pids)

    @contextlib.contextmanager
    def exclusive(self, deadline: float | None = None) -> Iterator[None]:
        yield

    def status(self) -> dict[str, str]:
        return {"shares": "active"}

    def pids(self, watcher: str) -> list[int]:
        return sorted(self.processes)

    def incr(self, watcher: str, count: int, deadline: float | None = None) -> int:
        self.numprocesses += count
        for _ in range(count):
            self.next_pid += 1
            self.processes.append(self.next_pid)
            self.events.append(f"start {self.next_pid}")
            if self.next_pid == self.fail_pid:
                self.processes.remove(self.next_pid)
            else:
                self.up.add(self.next_pid)
        return len(self.processes)

    def decr(self, watcher: str, count: int, deadline: float | None = None) -> int:
        self.numprocesses -= count
        extra = max(0, len(self.processes) - self.numprocesses)
        for pid in self.processes[:extra]:
            self.events.append(f"stop {pid}")
            self.up.discard(pid)
        self.processes = self.processes[extra:]
        return self.numprocesses

    def call(self, command: str, deadline: float | None = None, **properties: Any) -> dict[str, Any]:
        self.events.append(f"{command} {properties.get('pid')}")
        if command == "kill" and properties.get("pid") in self.processes:
            self.processes.remove(properties["pid"])
        return {"status": "ok"}


def _restart(circus: FakeCircus, batch: int = 1) -> RollingRestart:
    return RollingRestart(circus, "shares", lambda: set(circus.up), batch=batch, register_timeout=1.0,
                          sleep=lambda s: None)


def test_each_replacement_is_registered_before_an_old_process_stops() -> None:
    circus = FakeCircus([1, 2, 3])
    steps = _restart(circus).run(deadline=float("inf"))
    assert circus.events == ["start 1001", "stop 1", "start 1002", "stop 2", "start 1003", "stop 3"]
    assert [s.stopped for s in steps] == [(1,), (2,), (3,)]
    assert circus.pids("shares") == [1001, 1002, 1003]


def test_a_batch_replaces_several_at_a_time() -> None:
    circus = FakeCircus([1, 2, 3])
    steps = _restart(circus, batch=2).run(deadline=float("inf"))
    assert [s.stopped for s in steps] == [(1, 2), (3,)]
    assert circus.pids("shares") == [1001, 1002, 1003]


def test_a_new_process_that_exits_stops_the_restart_and_the_old_ones_keep_serving() -> None:
    circus = FakeCircus([1, 2], fail_pid=1002)
    with pytest.raises(RestartFailed, match=r"a new process exited at once.*abandoned"):
        _restart(circus).run(deadline=float("inf"))
    assert circus.events[:3] == ["start 1001", "stop 1", "start 1002"]
    assert 2 in circus.pids("shares"), "the old process that was not replaced still runs"


def test_a_new_process_that_exits_while_starting_stops_the_restart() -> None:
    circus = FakeCircus([1, 2])
    up = iter([set(), set()])

    def registered() -> set[int]:
        circus.processes.remove(1001)  # it exits while we wait for it
        return next(up)

    with pytest.raises(RestartFailed, match=r"pid 1001 exited before it registered"):
        RollingRestart(circus, "shares", registered, sleep=lambda s: None).run(deadline=float("inf"))
    assert "stop 1" not in circus.events and circus.pids("shares") == [1, 2]


def test_a_crashed_new_process_replaced_by_circus_leaves_the_old_ones_serving() -> None:
    """Circus reaps a crashed process and starts a copy in one check: the copy must go too, not an old one."""
    circus = FakeCircus([1])
    heard: list[list[int]] = []

    def registered() -> set[int]:
        if 1001 in circus.processes:  # it crashes; Circus starts pid 1002 in its place, which never registers
            circus.processes.remove(1001)
            circus.processes.append(1002)
        return {1}

    def explain(pids: list[int]) -> str:
        heard.append(pids)
        return "pid 1001 exited with status 2"

    restart = RollingRestart(circus, "shares", registered, sleep=lambda s: None, explain=explain)
    with pytest.raises(RestartFailed, match=r"(?s)pid 1001 exited before it registered.*runs pid 1\n"
                                            r"pid 1001 exited with status 2"):
        restart.run(deadline=float("inf"))
    assert heard == [[1001]]
    assert "kill 1002" in circus.events and "stop 1" not in circus.events
    assert circus.pids("shares") == [1]


def test_a_new_process_that_never_registers_times_out() -> None:
    circus = FakeCircus([1])
    clock = iter(range(100))
    restart = RollingRestart(circus, "shares", lambda: {1}, register_timeout=3.0,
                             clock=lambda: float(next(clock)), sleep=lambda s: None)
    with pytest.raises(RestartFailed, match="did not register within 3s"):
        restart.run(deadline=float("inf"))
    assert "kill 1001" in circus.events and circus.pids("shares") == [1]


def test_batch_must_be_positive() -> None:
    with pytest.raises(StackError):
        _restart(FakeCircus([1]), batch=0)


def test_say_never_raises_when_the_reader_has_gone() -> None:
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    try:
        assert say("stopping the stack", stream) is False  # EPIPE: SIGPIPE is ignored by Python
        assert say("again", stream) is True  # the descriptor now points at /dev/null
    finally:
        stream.close()


def test_a_busy_port_is_reported_from_circusds_log() -> None:
    log = ("2026-12-01 09:49:14 circus[14075] [INFO] Starting master on pid 14075\n"
           "2026-12-01 09:49:14 circus[14075] [ERROR] Could not bind 127.0.0.1:37431\n"
           "2026-12-01 09:49:14 circus[14075] [ERROR] exception [Errno 98] Address already in use caught\n")
    reason = startup_failure(log)
    assert reason is not None
    assert reason.startswith("Could not bind 127.0.0.1:37431; [Errno 98] Address already in use")
    assert "MESHKIT_STRATUM_PORT" in reason
    assert startup_failure("... [INFO] all fine\n") is None


def test_only_the_refused_periodic_check_is_filtered() -> None:
    class ConflictError(Exception):
        pass

    def record(message: str, exc: BaseException | None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, message, (), info)

    refused = ConflictError("arbiter is already running watcher_stop command")
    check = SkippedCheckFilter()
    assert not check.filter(record("Exception in callback <bound method Arbiter.manage_watchers of x>", refused))
    assert check.filter(record("Exception in callback <bound method Arbiter.reload of x>", refused))
    assert check.filter(record("Exception in callback manage_watchers", ValueError("real")))
    assert check.filter(record("plain error", None))
    assert sys.exc_info() == (None, None, None)


def test_backends_up_needs_every_backend_up() -> None:
    from meshkit.stack.readiness import backends_up

    head = "# pxname,svname,qcur,status\n"
    assert backends_up(head + "stratum,FRONTEND,,OPEN\ngateway.stratum,gw1,0,UP\ngateway.stratum,BACKEND,0,UP\n")
    assert not backends_up(head + "stratum,FRONTEND,,OPEN\ngateway.stratum,BACKEND,0,DOWN\n")
    assert not backends_up(head + "stratum,FRONTEND,,OPEN\n")
    assert not backends_up("")
