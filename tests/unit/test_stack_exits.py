"""Exits heard from circusd's events, worded with the end of the log; which watchers ``up`` awaits."""

from __future__ import annotations

from pathlib import Path

from meshkit.stack.exits import Exit, failure_report, log_tail, reaped
from meshkit.stack.readiness import runs_meshkit


def test_a_reap_event_is_an_exit_and_other_events_are_not() -> None:
    assert reaped("watcher.mining.reap", {"process_pid": 12, "exit_code": 2}) == Exit("mining", 12, 2)
    assert reaped("watcher.a.b.reap", {"process_pid": 12, "exit_code": None}) == Exit("a.b", 12, None)
    assert reaped("watcher.mining.spawn", {"process_pid": 12}) is None
    assert reaped("watcher.mining.reap", {"process_pid": "12"}) is None
    assert reaped("arbiter.reap", {"process_pid": 12}) is None


def test_the_status_says_how_it_exited() -> None:
    assert Exit("w", 1, 2).status() == "exited with status 2"
    assert Exit("w", 1, 0).status() == "exited with status 0"
    assert Exit("w", 1, -9).status() == "was killed by SIGKILL"
    assert Exit("w", 1, None).status() == "exited (status unknown)"


def test_the_tail_is_the_last_lines_each_clipped(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "\n" + "x" * 5000 + "\n")
    tail = log_tail(str(log), lines=3)
    assert tail[:2] == ["line 98", "line 99"]
    assert tail[2].startswith("x" * 200) and len(tail[2]) < 260
    assert log_tail(str(tmp_path / "missing.log")) == []


def test_the_report_names_each_watcher_its_exits_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "fragile.log"
    log.write_text("Traceback (most recent call last):\nModuleNotFoundError: No module named 'x'\n")
    exits = [Exit("fragile", 10, 2), Exit("panel", 11, 1), Exit("fragile", 12, 2)]
    report = failure_report(exits, {"fragile": str(log)}.get, "failed as the stack started")
    first, *rest = report.splitlines()
    assert first == (f"fragile failed as the stack started: pid 10 exited with status 2; "
                     f"pid 12 exited with status 2; the end of {log}:")
    assert rest[:2] == ["    Traceback (most recent call last):", "    ModuleNotFoundError: No module named 'x'"]
    assert rest[2] == "panel failed as the stack started: pid 11 exited with status 1"


def test_meshkit_programs_are_recognised_by_their_command() -> None:
    assert runs_meshkit("/venv/bin/python -m meshkit run services.mining:Mining")
    assert runs_meshkit("/venv/bin/python -m meshkit haproxy sync --config x")
    assert runs_meshkit("/venv/bin/meshkit panel --run-dir /r")
    assert not runs_meshkit('/venv/bin/python -c "import sys; sys.exit(3)"')
    assert not runs_meshkit("redis-server --port 0")
    assert not runs_meshkit("python -m meshkitten run")
