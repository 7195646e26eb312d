"""What the HAProxy tests share: fake gateways and records, the sync process, connecting through HAProxy.

"Gateways" here are plain TCP servers that greet every connection with their
name and then echo, registered as fake ``gateway`` records; :class:`Sync`
runs ``python -m meshkit haproxy sync`` with a config of the test's own.
Nothing uses a fixed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import redis

from meshkit import Settings
from meshkit.haproxy.render import RuntimePaths
from meshkit.haproxy.runtime import MasterCLI, RuntimeAPI, ServerState
from meshkit.record import UP, InstanceRecord
from meshkit.registry import Keys
from meshkit.stack.processes import stack_processes
from meshkit.testing import ProcessExitedError, find_program, settings_env, tcp_listener, wait_until

REPO = Path(__file__).resolve().parents[2]
BACKEND = "gateway.stratum"
WAIT = 10.0


class Gateway:
    """A TCP server on a kernel-chosen port: says its name on connect, then echoes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.listener = tcp_listener()
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            conn.sendall(self.name.encode() + b"\n")
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self._conns:
            conn.close()

    def record(self, state: str = UP) -> InstanceRecord:
        return InstanceRecord(
            service="gateway", instance_id=self.name, endpoint="tcp://127.0.0.1:1", host="127.0.0.1",
            pid=os.getpid(), state=state, started_at=time.time(), listeners={"stratum": self.address},
        )


class FakeRegistry:
    """Writes and deletes records the way :class:`~meshkit.registration.Registration` does, without a heartbeat."""

    def __init__(self, settings: Settings) -> None:
        self.keys = Keys(settings.namespace)
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0)

    def put(self, record: InstanceRecord) -> None:
        data = record.to_json()
        self.client.set(self.keys.instance(record.key), data, px=600_000)
        self.client.publish(self.keys.changes, '{"op":"set","record":' + data + "}")

    def delete(self, record: InstanceRecord) -> None:
        self.client.delete(self.keys.instance(record.key))
        self.client.publish(self.keys.changes, json.dumps({"op": "del", "key": record.key}))


class Sync:
    """``python -m meshkit haproxy sync`` in a child process, with its HAProxy."""

    def __init__(self, settings: Settings, directory: Path, public: socket.socket, extra: str = "",
                 bind: str | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.public = public  # fd@N unless ``bind`` (host:port) is given; then it only reserves the port
        self.port = public.getsockname()[1]
        self.bind = bind
        self.paths = RuntimePaths.in_dir(directory / "run")
        self.toml = directory / "haproxy.toml"
        self.stop_timeout = 5.0
        self.hard_stop_after = "5s"
        self.write_config(extra)
        self.log_path = directory / "sync.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.attached = False

    def write_config(self, extra: str = "") -> None:
        self.toml.write_text(f"""
[haproxy]
templates = "{REPO / 'haproxy'}"
hard_stop_after = "{self.hard_stop_after}"
stop_timeout = {self.stop_timeout}
reconcile_interval = 0.5
{"" if "send_proxy" in extra else 'send_proxy = "none"  # these gateways echo what they get: no PROXY header'}
{extra}

[haproxy.check]
tcp_check = "connect"  # these gateways greet and echo; they do not speak JSON-RPC

[[frontend]]
name = "stratum"
bind = "127.0.0.1:1"
service = "gateway"
listener = "stratum"
""")

    def meshkit_haproxy(self, action: str, *args: str) -> list[str]:
        """The command line of ``meshkit haproxy ACTION`` for this test's config and run directory."""
        bind = self.bind or f"fd@{self.public.fileno()}"
        return [sys.executable, "-m", "meshkit", "haproxy", action, "--config", str(self.toml),
                "--run-dir", str(self.paths.config_file.parent), "--bind", f"stratum={bind}",
                "--haproxy", find_program("haproxy"), *args]

    def start(self, *args: str) -> Sync:
        """Start sync (owning HAProxy unless ``--attach`` is in ``args``) and wait for HAProxy to answer."""
        env = {**os.environ, **settings_env(self.settings), "MESHKIT_LOG_FORMAT": "text", "MESHKIT_LOG_LEVEL": "DEBUG"}
        self.attached = "--attach" in args
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.meshkit_haproxy("sync", *args),
                env=env, pass_fds=() if self.bind else (self.public.fileno(),), stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO,
            )
        wait_until(lambda: self.alive() and self.master_pid() and self.servers() is not None, WAIT,
                   "the sync process and haproxy to answer")
        return self

    def alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ProcessExitedError(f"sync exited with {self.process.returncode}:\n{self.log()}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def master_pid(self) -> int | None:
        try:
            pid = int(self.paths.pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def servers(self) -> dict[str, ServerState]:
        states = asyncio.run(RuntimeAPI(self.paths.stats_socket).servers())
        return {s.name: s for s in states if s.backend == BACKEND}

    def reloads(self) -> int:
        return asyncio.run(MasterCLI(self.paths.master_socket).processes()).reloads

    def workers(self) -> tuple[int, ...]:
        return asyncio.run(MasterCLI(self.paths.master_socket).processes()).workers

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; wait for the exit and return its status and how long the stop took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        return code, time.monotonic() - started

    def stop(self) -> int | None:
        """SIGTERM; return the exit status (killing it if it hangs). HAProxy stays: see :func:`kill_haproxy`."""
        if self.process is None:
            return None
        code: int | None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            code = None
        return code


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (an exited child of a reparented worker) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def greeting(port: int, timeout: float = 3.0) -> str:
    """Connect through HAProxy and return the name of the gateway that answered ("" if none did)."""
    sock, name = held(port, timeout)
    sock.close()
    return name


def held(port: int, timeout: float = 3.0) -> tuple[socket.socket, str]:
    """An open connection through HAProxy and the name of the gateway holding it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return sock, data.decode().strip()


def kill_haproxy(paths: RuntimePaths) -> None:
    """SIGKILL every process naming the run directory of ``paths`` (HAProxy masters, workers, syncs left behind).

    Test teardown: HAProxy outlives the sync, and a failed test may leave a
    sync or an old master running too. A test's sync is not started by
    ``meshkit up``, so its HAProxy carries no stack marker: processes are
    also found by their command line (HAProxy's ``-f``/``-p``/``-S`` name
    files in the run directory). Returns once they are gone (bounded).
    """
    run_dir = str(paths.config_file.parent)
    found = {proc.pid: proc for proc in stack_processes(run_dir)}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid != os.getpid() and any(run_dir + os.sep in arg for arg in cmdline):
            found.setdefault(proc.pid, proc)
    for proc in found.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(found.values()), timeout=WAIT)


@contextlib.contextmanager
def running_sync(settings: Settings, directory: Path) -> Iterator[Sync]:
    """A :class:`Sync` on a public listener of its own; stopped, its HAProxy killed and the listener closed after."""
    public = tcp_listener()
    runner = Sync(settings, directory, public)
    try:
        yield runner
    finally:
        runner.stop()
        kill_haproxy(runner.paths)
        public.close()


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound (not listening) on a kernel-chosen port that HAProxy may bind too.

    Both sides set ``SO_REUSEPORT``, so HAProxy can bind ``host:port`` while
    this socket keeps the port; it never listens, so it takes no connection.
    Close it once HAProxy listens.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


REQUEST = b'{"jsonrpc": "2.0", "id": 1, "method": "gwprobe.echo", "params": ["loop"]}\n'


class ConnectLoop:
    """New connections through HAProxy in a tight loop, each sending one line and waiting for one line.

    A connection refused, reset, closed before answering, or answered later
    than ``timeout`` is a failure; :attr:`slowest` is the longest a
    successful one took.
    """

    def __init__(self, port: int, timeout: float = 3.0, request: bytes = REQUEST) -> None:
        self.port = port
        self.timeout = timeout
        self.request = request
        self.ok = 0
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ConnectLoop:
        self._thread.start()
        wait_until(lambda: self.ok > 20 or self.failures, WAIT, "connections to flow")
        return self

    def flowing(self, more: int = 50) -> None:
        """Wait until ``more`` further connections succeeded."""
        mark = self.ok
        wait_until(lambda: self.ok >= mark + more, WAIT, f"{more} more connections through haproxy")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
                    sock.settimeout(self.timeout)
                    sock.sendall(self.request)
                    data = b""
                    while b"\n" not in data:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        data += chunk
            except OSError as exc:
                self.failures.append(f"{time.strftime('%X')} {exc!r}")
                continue
            if b"\n" not in data:
                self.failures.append(f"{time.strftime('%X')} closed without an answer")
                continue
            self.ok += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
