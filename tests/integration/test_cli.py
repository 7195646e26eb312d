"""The ``meshkit`` command line as a user types it: real processes, real Redis, real exit statuses.

Every command runs as ``python -m meshkit ...`` in a child process with an
environment stripped of ``MESHKIT_*`` variables, plus those the test gives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from meshkit.config import Settings
from meshkit.registry import read_records
from meshkit.stack.processes import stack_processes, terminate
from meshkit.testing import settings_env, test_settings, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ECHO = "services.echo:Echo"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``MESHKIT_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    env["PYTHONPATH"] = str(ROOT)  # `services.echo` from any working directory
    env.update(extra)
    return env


def meshkit(*args: str, env: dict[str, str], cwd: Path = ROOT,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshkit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def table(stdout: str) -> list[dict[str, str]]:
    """The rows of a ``meshkit ls`` / ``status`` table, as dicts keyed by the header."""
    lines = stdout.strip().splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]


@pytest.fixture
def cli_env(mesh_settings: Settings) -> dict[str, str]:
    return clean_env(**settings_env(mesh_settings))


# -- call: arguments (#8.5) ------------------------------------------------------


def test_an_argument_that_is_not_json_is_an_error(start_service, cli_env: dict[str, str]) -> None:
    start_service(ECHO)
    result = meshkit("call", "echo", "echo", "{bad", env=cli_env)
    assert result.returncode == 2, result
    assert "argument 1 is not valid JSON" in result.stderr and "--raw" in result.stderr
    assert result.stdout == ""


def test_raw_passes_every_argument_as_a_string(start_service, cli_env: dict[str, str]) -> None:
    start_service(ECHO)
    result = meshkit("call", "echo", "echo", "--raw", "{bad", env=cli_env)
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == "{bad"


def test_keyword_arguments_reach_the_handler(start_service, cli_env: dict[str, str]) -> None:
    start_service(ECHO)
    result = meshkit("call", "echo", "echo", 'value={"a": [1, 2], "b": null}', env=cli_env)
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == {"a": [1, 2], "b": None}
    wrong = meshkit("call", "echo", "echo", "nope=1", env=cli_env)
    assert wrong.returncode == 1 and "[bad_arguments]" in wrong.stderr, wrong


def test_timeout_and_json_errors(start_service, cli_env: dict[str, str]) -> None:
    start_service(ECHO)
    started = time.monotonic()
    late = meshkit("call", "--json", "--timeout", "0.5", "echo", "sleep", "30", env=cli_env)
    elapsed = time.monotonic() - started
    assert late.returncode == 1, late
    error = json.loads(late.stdout)["error"]
    assert error["code"] == "timeout" and (error["service"], error["method"]) == ("echo", "sleep")
    assert elapsed < 20, elapsed  # the 0.5 s deadline, not the 30 s sleep (generous: a loaded machine)
    ok = meshkit("call", "--json", "echo", "echo", "7", env=cli_env)
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"result": 7}, ok
    missing = meshkit("call", "--json", "nosuch", "m", env=cli_env)
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"]["code"] == "no_instance", missing
    bad = meshkit("call", "--json", "echo", "echo", "{bad", env=cli_env)
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "usage", bad


def test_wait_rides_out_a_missing_instance(start_service, cli_env: dict[str, str]) -> None:
    nothing = meshkit("call", "echo", "echo", "1", env=cli_env)
    assert nothing.returncode == 1 and "[no_instance]" in nothing.stderr, nothing
    too_short = meshkit("call", "--wait", "--timeout", "0.5", "echo", "echo", "1", env=cli_env)
    assert too_short.returncode == 1 and "[timeout]" in too_short.stderr, too_short
    not_yet = meshkit("ls", "--wait", "1", "--timeout", "0.5", "echo", env=cli_env)
    assert not_yet.returncode == 1 and "0 of 1 instances of echo up after 0.5s" in not_yet.stderr, not_yet
    waiting = subprocess.Popen([sys.executable, "-m", "meshkit", "call", "--wait", "--timeout", "30",
                                "echo", "echo", '"late"'], env=cli_env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start_service(ECHO)
        out, err = waiting.communicate(timeout=40)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, err
    assert json.loads(out) == "late"


# -- ls: a killed instance (#8.9) -------------------------------------------------


def test_ls_shows_a_killed_instance_as_unreachable_while_its_record_remains(
        start_service, mesh_settings: Settings) -> None:
    # A long TTL: the record of the killed instance stays for the whole test.
    settings = mesh_settings.replace(ttl=60.0)
    env = clean_env(**settings_env(settings))
    victim, survivor = start_service(ECHO, count=2, settings=settings)
    victim.kill()
    result = meshkit("ls", env=env)
    assert result.returncode == 0, result
    states = {row["PID"]: row["STATE"] for row in table(result.stdout)}
    assert states == {str(victim.pid): "unreachable", str(survivor.pid): "up"}, result.stdout
    assert "unreachable (connection refused)" in result.stderr
    as_json = {r["pid"]: r for r in json.loads(meshkit("ls", "--json", env=env).stdout)}
    assert as_json[victim.pid]["reachable"] is False and as_json[survivor.pid]["reachable"] is True
    assert as_json[victim.pid]["unreachable"] == "connection refused"
    assert victim.pid in {r.pid for r in read_records(settings)}  # shown from what ls knows, not the TTL


# -- an unreachable registry (#7.10) -------------------------------------------------


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A Redis URL with a password whose port refuses connections (bound here, never listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"redis://:s3cret@127.0.0.1:{sock.getsockname()[1]}/0"
    finally:
        sock.close()


@pytest.mark.parametrize("command", [("ls",), ("call", "echo", "echo", "1"), ("publish", "news", "{}")],
                         ids=lambda c: c[0])
def test_unreachable_registry_is_an_error(command: tuple[str, ...], refusing_url: str,
                                          tmp_path: Path) -> None:
    for url in (refusing_url, f"unix://{tmp_path}/nothing.sock?password=s3cret"):
        result = meshkit(*command, env=clean_env(MESHKIT_REDIS_URL=url, MESHKIT_NAMESPACE="cli"))
        assert result.returncode == 1, result
        assert "s3cret" not in result.stderr, result.stderr
        line = result.stderr.strip()
        assert line.startswith("error: registry") and "unreachable" in line, line
        assert url.replace("s3cret", "***") in line, line
        assert result.stdout == ""


# -- the background Redis and finding the registry (#8.2) ----------------------------


@pytest.fixture
def local_redis(tmp_path: Path) -> Iterator[Path]:
    """A working directory for ``meshkit redis start``; whatever it started is stopped afterwards."""
    yield tmp_path
    pidfile = tmp_path / ".redis" / "redis.pid"
    meshkit("redis", "stop", env=clean_env(), cwd=tmp_path)
    if pidfile.exists():
        try:
            psutil.Process(int(pidfile.read_text())).kill()
        except (psutil.NoSuchProcess, ValueError):
            pass


def test_redis_start_prints_a_working_export_line_and_stop_stops_it(local_redis: Path) -> None:
    env = clean_env()
    first = meshkit("redis", "start", env=env, cwd=local_redis)
    assert first.returncode == 0, first
    socket_path = local_redis / ".redis" / "redis.sock"
    assert first.stdout == f"export MESHKIT_REDIS_URL=unix://{socket_path}\n"
    assert "started redis-server" in first.stderr
    pid = int((local_redis / ".redis" / "redis.pid").read_text())
    # The line works in a shell: the command run after it reads that Redis, and says nothing about guessing.
    shell = subprocess.run(["sh", "-c", 'eval "$(cat)"; exec "$0" -m meshkit ls', sys.executable],
                           input=first.stdout, env=env, cwd=local_redis, capture_output=True, text=True,
                           timeout=60)
    assert shell.returncode == 0 and "registry:" not in shell.stderr, shell
    assert redis.Redis(unix_socket_path=str(socket_path)).ping()

    second = meshkit("redis", "start", env=env, cwd=local_redis)
    assert second.returncode == 0 and second.stdout == first.stdout, second
    assert f"already running at unix://{socket_path} (pid {pid})" in second.stderr
    assert meshkit("redis", "status", env=env, cwd=local_redis).returncode == 0

    stop = meshkit("redis", "stop", env=env, cwd=local_redis)
    assert stop.returncode == 0 and "stopped" in stop.stderr, stop
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    status = meshkit("redis", "status", env=env, cwd=local_redis)
    assert status.returncode == 1 and "not running" in status.stdout, status
    again = meshkit("redis", "stop", env=env, cwd=local_redis)
    assert again.returncode == 0 and "no Redis running" in again.stderr, again


def test_commands_without_the_url_find_the_background_redis_and_say_so(local_redis: Path) -> None:
    started = meshkit("redis", "start", env=clean_env(), cwd=local_redis)
    assert started.returncode == 0, started
    namespace = "cli" + uuid.uuid4().hex[:8]
    env = clean_env(MESHKIT_NAMESPACE=namespace, MESHKIT_HEARTBEAT_INTERVAL="0.3", MESHKIT_TTL="2")
    url = f"unix://{local_redis}/.redis/redis.sock"
    log = (local_redis / "echo.log").open("w")
    service = subprocess.Popen([sys.executable, "-m", "meshkit", "run", ECHO], env=env, cwd=local_redis,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        settings = test_settings(url, namespace=namespace)
        wait_until(lambda: [r for r in read_records(settings) if r.pid == service.pid], 20,
                   "the service started without MESHKIT_REDIS_URL to register in the background Redis")
        ls = meshkit("ls", env=env, cwd=local_redis)
        assert ls.returncode == 0, ls
        assert f"registry: {url}, namespace {namespace} (the Redis of `meshkit redis start`" in ls.stderr
        assert [row["PID"] for row in table(ls.stdout)] == [str(service.pid)]
        call = meshkit("call", "echo", "echo", '"found"', env=env, cwd=local_redis)
        assert call.returncode == 0 and json.loads(call.stdout) == "found", call
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        log.close()


def test_meshkit_down_leaves_the_background_redis_alone(local_redis: Path) -> None:
    # Even started from a shell where MESHKIT_RUN_DIR names the stack's run directory.
    (local_redis / ".run").mkdir()
    env = clean_env(MESHKIT_RUN_DIR=str(local_redis / ".run"))
    assert meshkit("redis", "start", env=env, cwd=local_redis).returncode == 0
    down = meshkit("down", env=env, cwd=local_redis)
    assert down.returncode == 0, down
    assert meshkit("redis", "status", env=env, cwd=local_redis).returncode == 0, down


TINY_STACK = """
[circus]
endpoint = ipc://$(circus.env.MESHKIT_RUN_DIR)/circus.sock
pubsub_endpoint = ipc://$(circus.env.MESHKIT_RUN_DIR)/circus-pubsub.sock
stats_endpoint = ipc://$(circus.env.MESHKIT_RUN_DIR)/circus-stats.sock
multicast_endpoint =
check_delay = 0.5
pidfile = $(circus.env.MESHKIT_RUN_DIR)/circusd.pid
logoutput = $(circus.env.MESHKIT_RUN_DIR)/circusd.log

[watcher:echo]
cmd = $(circus.env.MESHKIT_PYTHON) -m meshkit run services.echo:Echo
working_dir = $(circus.env.MESHKIT_HOME)
numprocesses = 1
copy_env = True
stop_signal = TERM
graceful_timeout = 5
"""


def test_status_and_ls_find_the_stack_of_the_run_directory(mesh_settings: Settings, tmp_path: Path) -> None:
    run_dir = tmp_path / ".run"
    ini = tmp_path / "circus.ini"
    ini.write_text(TINY_STACK)
    stack_env = clean_env(**settings_env(mesh_settings), MESHKIT_HOME=str(ROOT))
    up = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=stack_env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        bare = clean_env()  # a new shell in the project directory: no MESHKIT_* at all
        status = meshkit("status", env=bare, cwd=tmp_path)
        assert status.returncode == 0, status
        rows = table(status.stdout.split("\n\n")[0])
        assert [r["SERVICE"] for r in rows if r["WATCHER"] == "echo"] == ["echo"], status.stdout
        ls = meshkit("ls", env=bare, cwd=tmp_path)
        assert ls.returncode == 0, ls
        assert [row["SERVICE"] for row in table(ls.stdout)] == ["echo"], ls.stdout
        assert (f"registry: {mesh_settings.redis_url}, namespace {mesh_settings.namespace} "
                f"(the stack running from {run_dir})") in ls.stderr
    finally:
        meshkit("down", "--run-dir", str(run_dir), env=stack_env)
        terminate(stack_processes(str(run_dir)), grace=5)


def readme_block(after: str, language: str = "") -> str:
    """The first fenced block of README.md that follows the text ``after``."""
    text = (ROOT / "README.md").read_text().split(after, 1)[1]
    return text.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_quickstart_runs_as_written(local_redis: Path) -> None:
    (local_redis / "hello.py").write_text(readme_block("save this as `hello.py`", "python"))
    (local_redis / "client.py").write_text(readme_block("save this as `client.py`", "python"))
    setup = readme_block("## Quickstart").splitlines()
    assert setup[0].startswith("make sysdeps venv") and setup[1].startswith(". .venv/bin/activate")
    # The rest, literally, in one non-interactive bash: what a user pastes after `make` and activate.
    script = "\n".join(["set -e", setup[2], readme_block("Run two instances and use them"),
                        "python client.py", readme_block("Stop the instances")])
    env = clean_env(MESHKIT_NAMESPACE="cli" + uuid.uuid4().hex[:8],
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", script], env=env, cwd=local_redis, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    for expected in ['"hello, world"', '{"delivered": 2}', "hello-1.log:1", "hello-2.log:1"]:
        assert expected in lines, result.stdout
    assert lines.count('"hello, world"') == 2  # positional and keyword
    assert lines.count("hello, world") == 2, result.stdout  # client.py: blocking and asyncio
    listed = [row for row in table(result.stdout) if row.get("SERVICE") == "hello"]
    assert [row["STATE"] for row in listed] == ["up", "up"], result.stdout
    assert not (local_redis / ".redis" / "redis.sock").exists()  # `meshkit redis stop` ran
