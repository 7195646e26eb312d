"""A service of the stack that exits as it starts: ``meshkit up`` and ``meshkit restart`` say so at once.

Each test runs a real circusd on the project's ``circus.ini`` plus one watcher
running a service module of the test's own (in its temporary directory), which
fails at import when a flag file exists. The command under test must return
within seconds, not after its readiness timeout, name the service, its exit
status and the end of its log, and leave no process of the stack behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from stackkit import meshkit, stack_files

from meshkit.config import Settings
from meshkit.registry import read_records
from meshkit.stack.control import CircusControl
from meshkit.stack.processes import stack_processes, terminate
from meshkit.testing import wait_until

pytestmark = pytest.mark.integration

# Fails at import while broken.flag exists beside it: what a missing dependency,
# a syntax error or a bad setting read at import look like to the stack.
FRAGILE = '''
import os

import meshkit

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "broken.flag")):
    import meshkit_no_such_dependency  # noqa: F401


class Fragile(meshkit.Service):
    name = "fragile"

    @meshkit.rpc
    def ping(self) -> str:
        return "pong"
'''


def fragile_stack(tmp_path: Path, broken: bool) -> tuple[dict[str, str], Path, Path]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "fragile.py").write_text(FRAGILE)
    if broken:
        (code / "broken.flag").write_text("")
    extra = f"""
[watcher:fragile]
cmd = $(circus.env.MESHKIT_PYTHON) -m meshkit run fragile:Fragile
working_dir = {code}
numprocesses = 1
priority = 40
copy_env = True
stop_signal = TERM
graceful_timeout = 5
stderr_stream.class = FileStream
stderr_stream.filename = $(circus.env.MESHKIT_RUN_DIR)/fragile.log
"""
    return stack_files(tmp_path, extra)


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "foreground"])
def test_up_reports_a_service_that_fails_at_import_at_once(tmp_path: Path, daemon: bool) -> None:
    env, run_dir, ini = fragile_stack(tmp_path, broken=True)
    try:
        started = time.monotonic()
        result = meshkit("up", *(["--daemon"] if daemon else []), "--timeout", "120", "--circus-ini", str(ini),
                         "--run-dir", str(run_dir), env=env, timeout=150)
        took = time.monotonic() - started
        assert result.returncode != 0, result.stdout + result.stderr
        # Well before the readiness timeout: the stack's own start and stop take a few seconds.
        assert took < 30, (took, result.stderr)
        err = result.stderr
        assert "fragile" in err and "exited with status 2" in err, err
        assert "No module named 'meshkit_no_such_dependency'" in err, err  # the end of its log
        assert str(run_dir / "fragile.log") in err, err
        assert "not ready after" not in err, err
        assert "stack is up" not in result.stdout
        assert not stack_processes(str(run_dir))
        assert not (run_dir / "circusd.pid").exists() or not _alive_pidfile(run_dir / "circusd.pid")
    finally:
        terminate(stack_processes(str(run_dir)), grace=5)


def test_restart_reports_a_replacement_that_fails_at_import(tmp_path: Path) -> None:
    env, run_dir, ini = fragile_stack(tmp_path, broken=False)
    try:
        result = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        env["MESHKIT_REDIS_URL"] = f"unix://{run_dir}/redis.sock"
        control = CircusControl(f"ipc://{run_dir}/circus.sock", str(run_dir / "control.lock"))
        old = control.pids("fragile")
        assert len(old) == 1

        (tmp_path / "code" / "broken.flag").write_text("")  # the code on disk breaks
        started = time.monotonic()
        restart = meshkit("restart", "fragile", "--register-timeout", "120", "--run-dir", str(run_dir), env=env,
                          timeout=150)
        took = time.monotonic() - started
        assert restart.returncode != 0, restart.stdout + restart.stderr
        assert took < 20, (took, restart.stderr)
        err = restart.stderr
        assert "fragile" in err and "exited with status 2" in err, err
        assert "No module named 'meshkit_no_such_dependency'" in err, err
        # The old process still serves, alone.
        settings = Settings.load(env=env)
        wait_until(lambda: control.pids("fragile") == old, 10, "the watcher to be back to its old process")
        assert [r.pid for r in read_records(settings, "fragile")] == old
    finally:
        tree = stack_processes(str(run_dir))
        meshkit("down", "--run-dir", str(run_dir), env=env)
        psutil.wait_procs(tree, timeout=30)
        terminate(stack_processes(str(run_dir)), grace=5)


def _alive_pidfile(path: Path) -> bool:
    try:
        return psutil.Process(int(path.read_text())).status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, psutil.Error):
        return False
