"""The whole stack from circus.ini: up, calls through HAProxy and a gateway, scaling,
a killed backend, flap control, down — with kernel-chosen public ports and an
embedded Redis in a temporary run directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from stackkit import ROOT, meshkit, stack_files

from meshkit.config import Settings
from meshkit.registry import read_records
from meshkit.stack.control import CircusControl
from meshkit.stack.processes import stack_processes, terminate
from meshkit.testing import wait_until

pytestmark = pytest.mark.integration

CRASHER = """
[watcher:crasher]
cmd = $(circus.env.MESHKIT_PYTHON) -c "import sys; sys.exit(3)"
numprocesses = 1
priority = 10
copy_env = True

# Ignores SIGTERM, so stopping it keeps circusd busy for graceful_timeout.
[watcher:stubborn]
cmd = $(circus.env.MESHKIT_PYTHON) -c "import signal as s, time; s.signal(s.SIGTERM, s.SIG_IGN); time.sleep(3600)"
numprocesses = 1
priority = 10
graceful_timeout = 3
copy_env = True
"""


class JsonRpcClient:
    """A newline-delimited JSON-RPC client connection (to HAProxy's public port)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.file = self.sock.makefile("rwb")
        self.next_id = 0

    def request(self, method: str, params: list[object]) -> dict[str, object]:
        self.next_id += 1
        line = json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        self.file.write(line.encode() + b"\n")
        self.file.flush()
        while True:
            raw = self.file.readline()
            assert raw, "connection closed by the server"
            message = json.loads(raw)
            if message.get("id") == self.next_id:
                return dict(message)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, object]]:
    env, run_dir, ini = stack_files(tmp_path, CRASHER)
    result = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=env)
    pid_file = run_dir / "circusd.pid"
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        # The run directory is not ./.run: the welcome text says how the other commands find it.
        assert f"export MESHKIT_RUN_DIR={run_dir}" in result.stdout, result.stdout
        env["MESHKIT_REDIS_URL"] = f"unix://{run_dir}/redis.sock"
        circusd = psutil.Process(int(pid_file.read_text()))
        yield {"env": env, "run_dir": run_dir, "circusd": circusd}
    finally:
        if pid_file.exists():
            descendants: list[psutil.Process] = []
            try:
                root = psutil.Process(int(pid_file.read_text()))
                descendants = [root, *root.children(recursive=True)]
            except (psutil.NoSuchProcess, ValueError):
                pass
            down = meshkit("down", "--run-dir", str(run_dir), env=env)
            for proc in descendants:
                try:
                    proc.wait(30)
                except psutil.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            assert down.returncode == 0, down.stderr


def test_stack_lifecycle(stack: dict[str, object]) -> None:
    env = stack["env"]
    run_dir = stack["run_dir"]
    circusd = stack["circusd"]
    assert isinstance(env, dict) and isinstance(run_dir, Path) and isinstance(circusd, psutil.Process)
    settings = Settings.load(env=env)
    control = CircusControl(f"ipc://{run_dir}/circus.sock", str(run_dir / "control.lock"))

    # Public port chosen by the kernel, read back from Circus.
    host, port = control.sockets()["stratum"].rsplit(":", 1)
    assert int(port) > 0

    status = meshkit("status", "--run-dir", str(run_dir), env=env)
    assert status.returncode == 0, status.stderr
    assert "gateway" in status.stdout and "mining" in status.stdout and "up" in status.stdout
    assert status.stdout.split()[:4] == ["WATCHER", "STATUS", "PID", "UP"], status.stdout
    assert re.search(r"^haproxy: master pid \d+$", status.stdout, re.M), status.stdout

    client = JsonRpcClient((host, int(port)))
    try:
        reply = client.request("mining.stats", [])
        assert "result" in reply, reply

        # Scale the backends up: the mesh follows within a second of registration.
        assert meshkit("scale", "mining", "4", "--run-dir", str(run_dir), env=env).returncode == 0
        wait_until(lambda: len(read_records(settings, "mining")) == 4, 15, "4 mining instances")
        # Scale gateways up: HAProxy gets the new server within a second.
        assert meshkit("scale", "gateway", "3", "--run-dir", str(run_dir), env=env).returncode == 0
        wait_until(lambda: len(read_records(settings, "gateway")) == 3, 15, "3 gateways")
        registered = time.monotonic()
        wait_until(lambda: _haproxy_servers_up(run_dir) >= 3, 5, "HAProxy to have 3 gateway servers")
        assert time.monotonic() - registered < 1.5

        # Scale back down; calls keep working.
        assert meshkit("scale", "mining", "2", "--run-dir", str(run_dir), env=env).returncode == 0
        wait_until(lambda: len(read_records(settings, "mining")) == 2, 20, "2 mining instances")
        assert meshkit("scale", "gateway", "2", "--run-dir", str(run_dir), env=env).returncode == 0
        # Our connection may have been on the gateway that left: it was closed
        # at the end of that gateway's grace period, so connect again.
        client.close()
        client = JsonRpcClient((host, int(port)))
        for _ in range(20):
            assert "result" in client.request("mining.stats", [])

        # A rolling restart, two at a time: new processes, the same number, calls keep working.
        before = set(control.pids("mining"))
        restart = meshkit("restart", "mining", "--batch", "2", "--run-dir", str(run_dir), env=env)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        assert "registered after" in restart.stdout and "2 processes replaced in 1 steps" in restart.stdout
        assert len(control.pids("mining")) == 2 and not before & set(control.pids("mining"))
        assert "result" in client.request("mining.stats", [])
        refused = meshkit("restart", "flapguard", "--run-dir", str(run_dir), env=env)
        assert refused.returncode != 0 and "not a meshkit service" in refused.stderr, refused.stderr
        for command in (["scale", "nosuch", "3"], ["stop", "nosuch"], ["start", "nosuch"], ["restart", "nosuch"]):
            unknown = meshkit(*command, "--run-dir", str(run_dir), env=env)
            assert unknown.returncode != 0 and "no watcher named 'nosuch'" in unknown.stderr, unknown.stderr

        # Kill a backend: calls are routed around it, Circus replaces it.
        victim = control.pids("mining")[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(50):
            assert "result" in client.request("mining.stats", [])
        wait_until(lambda: victim not in control.pids("mining") and len(control.pids("mining")) == 2,
                   10, "Circus to replace the killed backend")
        wait_until(lambda: len(read_records(settings, "mining")) == 2
                   and all(r.pid != victim for r in read_records(settings, "mining")),
                   10, "the replacement to register")
    finally:
        client.close()

    # Flap control stopped the crashing watcher and said so.
    wait_until(lambda: control.status().get("crasher") == "stopped", 30, "flap control to stop crasher")
    assert "crasher" in json.loads((run_dir / "flapped.json").read_text())
    assert "FLAPPING" in (run_dir / "flapguard.log").read_text()
    status = meshkit("status", "--run-dir", str(run_dir), env=env)
    assert "flapping" in status.stdout

    # By hand, a flap-stopped watcher starts again with a fresh budget (and,
    # still broken, trips again: a new record, newer than the first).
    first_trip = json.loads((run_dir / "flapped.json").read_text())["crasher"]["at"]
    assert meshkit("start", "crasher", "--run-dir", str(run_dir), env=env).returncode == 0
    wait_until(lambda: json.loads((run_dir / "flapped.json").read_text()).get("crasher", {}).get("at", 0)
               > first_trip and control.status().get("crasher") == "stopped", 30, "flap control to trip again")

    # Circus 0.19 refuses a command while an exclusive one runs (this is what
    # drops the stock flapping plugin's fire-and-forget stop); meshkit retries.
    from circus.client import CircusClient

    busy = threading.Thread(target=control.stop, args=("stubborn",))
    busy.start()
    try:
        raw = CircusClient(endpoint=control.endpoint, timeout=5)
        wait_until(lambda: _refused(raw.call({"command": "stop", "properties": {"name": "jobs"}})), 5,
                   "circusd to refuse a command while stopping 'stubborn'")
        raw.stop()
        started = time.monotonic()
        control.stop("jobs")  # the same command through meshkit: retried until circusd is free
        assert control.status()["jobs"] == "stopped"
        assert time.monotonic() - started > 0.2
    finally:
        busy.join(30)

    # Everything the stack started stops with it.
    children = circusd.children(recursive=True)
    assert meshkit("down", "--run-dir", str(run_dir), env=env).returncode == 0
    _, alive = psutil.wait_procs([circusd, *children], timeout=60)
    assert not alive, f"still running after down: {alive}"


def _refused(reply: dict[str, object]) -> bool:
    return reply.get("status") == "error" and "already running" in str(reply.get("reason"))


def _haproxy_servers_up(run_dir: Path) -> int:
    """Servers of the gateway backend that HAProxy reports as UP, via its stats socket."""
    sockets = list(run_dir.glob("haproxy*.sock"))
    stats = [s for s in sockets if "master" not in s.name]
    if not stats:
        return 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(stats[0]))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    count = 0
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[1] not in ("FRONTEND", "BACKEND") and fields[17].startswith("UP"):
            count += 1
    return count


def test_foreground_up_stops_the_whole_stack_on_ctrl_c(tmp_path: Path) -> None:
    env, run_dir, ini = stack_files(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "meshkit", "up", "--circus-ini", str(ini), "--run-dir",
                           str(run_dir)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    try:
        assert up.stdout is not None
        lines: list[str] = []
        for line in up.stdout:  # the welcome text is the readiness signal
            lines.append(line)
            if "stack is up" in line:
                break
        assert any("stack is up" in line for line in lines), "".join(lines)
        processes = stack_processes(str(run_dir), int((run_dir / "circusd.pid").read_text()))
        assert len(processes) >= 8, processes  # circusd, redis, haproxy + sync, gateways, backends, ...
        up.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        assert up.wait(60) == 0
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive, f"still running after Ctrl-C: {alive}"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        if up.stdout is not None:
            up.stdout.close()
        terminate(stack_processes(str(run_dir)), grace=5)


def test_down_stops_the_processes_of_a_dead_circusd(tmp_path: Path) -> None:
    env, run_dir, ini = stack_files(tmp_path)
    bystander: subprocess.Popen[bytes] | None = None
    try:
        result = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        circusd = int((run_dir / "circusd.pid").read_text())
        orphans = [p for p in stack_processes(str(run_dir), circusd) if p.pid != circusd]
        os.kill(circusd, signal.SIGKILL)  # its processes live on in their own sessions
        psutil.wait_procs([psutil.Process(circusd)], timeout=10)
        assert all(p.is_running() for p in orphans)
        # An operator's shell with the welcome text's variables exported, and a
        # `tail -f` of a log in the run directory: not part of the stack.
        bystander = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", str(run_dir / "gateway.log")],
            env={**env, "MESHKIT_RUN_DIR": str(run_dir)})
        again = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=env)
        assert again.returncode != 0 and "meshkit down" in again.stderr, again.stderr
        down = meshkit("down", "--run-dir", str(run_dir), env=env)
        assert down.returncode == 0 and "leftover" in down.stdout, down.stdout + down.stderr
        _, alive = psutil.wait_procs(orphans, timeout=10)
        assert not alive, f"still running after down: {alive}"
        assert bystander.poll() is None, "meshkit down stopped a process that is not part of the stack"
    finally:
        if bystander is not None:
            bystander.kill()
            bystander.wait(10)
        terminate(stack_processes(str(run_dir)), grace=5)


def _tree(run_dir: Path) -> list[psutil.Process]:
    """circusd and every process under it, by pid (what a stop must leave nothing of)."""
    root = psutil.Process(int((run_dir / "circusd.pid").read_text()))
    return [root, *root.children(recursive=True)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal-closed"])
def test_foreground_up_stops_everything_when_its_reader_has_gone(tmp_path: Path, sig: signal.Signals) -> None:
    """`make demo | tee log` with tee gone, or a closed terminal: writing fails, stopping must not."""
    env, run_dir, ini = stack_files(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "meshkit", "up", "--circus-ini", str(ini), "--run-dir",
                           str(run_dir)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        assert up.stdout is not None
        lines: list[str] = []
        for line in up.stdout:
            lines.append(line)
            if "stack is up" in line:
                break
        assert any("stack is up" in line for line in lines), "".join(lines)
        tree = _tree(run_dir)
        assert len(tree) >= 8, tree
        up.stdout.close()  # the reader goes away: every later write of `meshkit up` fails
        up.send_signal(sig)
        assert up.wait(90) == 0
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, f"still running after {sig.name} with no reader: {alive}"
        assert not stack_processes(str(run_dir))
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        terminate([p for p in tree if p.is_running()] + stack_processes(str(run_dir)), grace=5)


def test_foreground_up_stops_everything_when_its_terminal_closes(tmp_path: Path) -> None:
    """A real terminal hung up: the kernel sends SIGHUP and every later write fails with EIO."""
    env, run_dir, ini = stack_files(tmp_path)
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # in the child: a session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    up = subprocess.Popen([sys.executable, "-m", "meshkit", "up", "--circus-ini", str(ini), "--run-dir",
                           str(run_dir)], env=env, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                          preexec_fn=controlling_terminal)
    os.close(slave)
    tree: list[psutil.Process] = []
    try:
        seen = b""
        deadline = time.monotonic() + 90
        while b"stack is up" not in seen and time.monotonic() < deadline and up.poll() is None:
            if select.select([master], [], [], 1.0)[0]:
                seen += os.read(master, 65536)
        assert b"stack is up" in seen, seen.decode(errors="replace")
        tree = _tree(run_dir)
        os.close(master)  # the terminal goes away
        master = -1
        assert up.wait(90) == 0
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, f"still running after the terminal closed: {alive}"
    finally:
        if master >= 0:
            os.close(master)
        if up.poll() is None:
            up.kill()
            up.wait(10)
        terminate([p for p in tree if p.is_running()] + stack_processes(str(run_dir)), grace=5)


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_busy_public_port_is_named_in_the_error(tmp_path: Path, daemon: bool) -> None:
    env, run_dir, ini = stack_files(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env["MESHKIT_STRATUM_PORT"] = str(port)
        try:
            result = meshkit("up", *(["--daemon"] if daemon else []), "--timeout", "30", "--circus-ini",
                             str(ini), "--run-dir", str(run_dir), env=env, timeout=60)
            assert result.returncode != 0
            assert "Address already in use" in result.stderr, result.stderr
            assert f"127.0.0.1:{port}" in result.stderr, result.stderr
            assert not stack_processes(str(run_dir))
        finally:
            terminate(stack_processes(str(run_dir)), grace=5)


def test_status_and_restart_without_a_stack_say_no_stack_is_running(tmp_path: Path) -> None:
    env, run_dir, _ = stack_files(tmp_path)
    for command in (["status"], ["restart", "mining"], ["scale", "mining", "3"]):
        result = meshkit(*command, "--run-dir", str(run_dir), env=env, timeout=30)
        assert result.returncode != 0
        assert "no stack is running" in result.stderr, (command, result.stderr)
        assert "Timed out" not in result.stderr


_NOISE = re.compile(r'"level":"(WARNING|ERROR|CRITICAL)"|\[(WARNING|ERROR|CRITICAL|ALERT)\]|Traceback|Error:')
# HAProxy's own notices, which it prints at its WARNING (or ALERT) level by
# design: a server's state set through the runtime API (drain, maintenance), a
# health check of a gateway that has just exited, the last gateway gone, and
# its soft stop; also a server added through the runtime API (which HAProxy
# creates in maintenance and reports leaving it), as for a gateway whose record
# the sync watcher read only after ``meshkit up`` had seen the first one UP.
# They are HAProxy's account of a shutdown, not meshkit's errors.
_HAPROXY_NOTICE = re.compile(r"^\[(WARNING|ALERT)\]\s+\(\d+\) : (CLI : )?(backend 'gateway\.\S+' has no server "
                             r"available!|Server gateway\.\S+ (enters drain state|"
                             r"is going DOWN for maintenance|is DOWN|remains in forced drain mode|was DOWN and now|"
                             r"is UP/READY \(leaving forced maintenance\))|"
                             r"Proxy .* stopped|Exiting Master process|Current worker .* exited with code 0|"
                             r"All workers exited)")


def _hold_until_closed(client: JsonRpcClient) -> threading.Thread:
    """Keep reading ``client`` in the background and close it when the server does (as a miner does)."""
    def read() -> None:
        try:
            while client.file.readline():
                pass
        except OSError:
            pass
        client.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def test_down_stops_in_order_and_leaves_clean_logs(tmp_path: Path) -> None:
    env, run_dir, ini = stack_files(tmp_path)
    try:
        result = meshkit("up", "--daemon", "--circus-ini", str(ini), "--run-dir", str(run_dir), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        control = CircusControl(f"ipc://{run_dir}/circus.sock")
        host, port = control.sockets()["stratum"].rsplit(":", 1)
        client = JsonRpcClient((host, int(port)))  # a connected client: the gateway has state to delete
        assert "result" in client.request("mining.authorize", ["alice", "x"])
        reader = _hold_until_closed(client)
        logs = sorted(run_dir.glob("*.log"))
        sizes = {log: log.stat().st_size for log in logs}
        tree = _tree(run_dir)
        down = meshkit("down", "--run-dir", str(run_dir), env=env)
        reader.join(10)
        assert not reader.is_alive(), "the gateway did not close its client's connection"
        assert down.returncode == 0, down.stdout + down.stderr
        # Each watcher as it begins to stop, in order: what a long drain is waiting for.
        said = re.findall(r"^  stopping (\S+)$", down.stderr, re.M)
        assert said[:3] == ["flapguard", "gateway", "haproxy"] and said[-1] == "redis", down.stderr
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive
        noise = []
        for log in logs:
            with open(log, "rb") as f:
                f.seek(sizes[log])
                for line in f.read().decode(errors="replace").splitlines():
                    if _NOISE.search(line) and not _HAPROXY_NOTICE.search(line):
                        noise.append(f"{log.name}: {line[:300]}")
        assert not noise, "\n".join(noise)
        # The order of meshkit/stack/order.py: the public side first, Redis last.
        circusd_log = (run_dir / "circusd.log").read_text()
        stopped = [w for w in re.findall(r"\[INFO\] (\S+) stopped", circusd_log) if not w.startswith("plugin:")]
        assert stopped[:3] == ["flapguard", "gateway", "haproxy"], stopped
        assert stopped[-1] == "redis" and {"mining", "jobs"} <= set(stopped), stopped
    finally:
        terminate(stack_processes(str(run_dir)), grace=5)
