"""Attacks on a gateway from outside, against real processes (issue #7's gateway defects).

Each test starts its own gateways (and HAProxy where the defect lives
between HAProxy and the gateway), in its own namespace, and waits for
positive signals with deadlines. The time bounds leave generous slack: the
machine running them is shared and noisy.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from lineclient import LineClient, error_code, line_clients

from meshkit import Client, Settings
from meshkit.gateway import jsonrpc
from meshkit.haproxy.model import server_name
from meshkit.haproxy.render import RuntimePaths
from meshkit.haproxy.runtime import RuntimeAPI
from meshkit.testing import ServiceProcess, find_program, settings_env, tcp_listener, wait_until

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
REPO = Path(__file__).resolve().parents[2]
_WAIT = 10.0

StartService = Callable[..., list[ServiceProcess]]


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


def start_gateway(start_service: StartService, **options: Any) -> tuple[ServiceProcess, str]:
    env = {f"MESHKIT_GATEWAY_{k.upper()}": str(v) for k, v in options.items()}
    [gw] = start_service(GATEWAY, env=env)
    assert gw.record is not None
    return gw, gw.record.listeners["stratum"]


def connect(address: str, rcvbuf: int = 0) -> socket.socket:
    """A raw client socket; with ``rcvbuf``, a small receive buffer set before connecting."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(_WAIT)
    sock.connect((host, int(port)))
    return sock


def gateway_holds(gw: ServiceProcess, client_port: int) -> bool:
    """Whether the gateway process still has a socket connected to ``client_port``."""
    return any(c.raddr and c.raddr.port == client_port
               for c in psutil.Process(gw.pid).net_connections(kind="tcp"))


def kernel_sockets(local_port: int, remote_port: int) -> list[str]:
    """TCP sockets the kernel keeps from ``local_port`` to ``remote_port`` (orphans included)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote = fields[1], fields[2]
            if (int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port):
                found.append(f"state {fields[3]} tx_queue {int(fields[4].split(':')[0], 16)}")
    return found


def fill_without_reading(sock: socket.socket, line: bytes, budget: float = 5.0) -> int:
    """Send ``line`` over and over, never reading, until the gateway stops taking them."""
    sock.setblocking(False)
    sent = 0
    stalled_since: float | None = None
    deadline = time.monotonic() + budget
    data = line * 200
    while time.monotonic() < deadline:
        try:
            sent += sock.send(data)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break  # everything between us and the gateway's paused reader is full
            time.sleep(0.01)  # the client's pace while its sends are blocked
    sock.setblocking(True)
    return sent


# -- defect 2: one connection stalls a gateway with batches -------------------------------


def test_a_batch_flood_on_one_connection_stalls_no_other_client(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    _, address = start_gateway(start_service)
    stop = threading.Event()
    flood_lines = [0]

    def flood() -> None:
        sock = connect(address)

        def drain() -> None:  # read the answers, so the flood is never slowed by backpressure
            try:
                while not stop.is_set() and sock.recv(1 << 20):
                    pass
            except OSError:
                pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        tiny = b"[" + b"1," * 8189 + b"1]\n"  # 16 KiB, 8,190 items: the reported attack
        widest = (b"[" + b",".join([b'{"jsonrpc":"2.0","method":"x","id":1}'] * 64) + b"]\n")
        try:
            while not stop.is_set():
                sock.sendall(tiny * 4 + widest * 4)
                flood_lines[0] += 8
        except OSError:
            pass
        finally:
            sock.close()
            reader.join(_WAIT)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_until(lambda: flood_lines[0] >= 400, _WAIT, "the flood to be under way")
        client = clients(address)
        times: list[float] = []
        flood_before = flood_lines[0]
        measuring = time.monotonic()
        while len(times) < 40 or time.monotonic() - measuring < 2.0:
            started = time.monotonic()
            assert "result" in client.call("mesh.hello")
            times.append(time.monotonic() - started)
        flooded = flood_lines[0] - flood_before
        assert flooded >= 200, f"only {flooded} flood lines during the measurement: it measured nothing"
    finally:
        stop.set()
        flooder.join(_WAIT)
    times.sort()
    print(f"round trips during the flood: median {times[len(times) // 2] * 1000:.1f} ms, "
          f"max {times[-1] * 1000:.1f} ms over {len(times)}; {flooded} flood lines meanwhile")
    assert times[-1] < 0.3, f"a well-behaved client waited {times[-1]:.2f} s during the flood"


# -- defect 3: a close that cannot flush leaks the socket -----------------------------------


def test_a_non_reading_client_closed_at_idle_is_really_gone_and_counts_until_then(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    idle, close_timeout = 1.0, 2.0
    gw, address = start_gateway(start_service, idle_timeout=idle, close_timeout=close_timeout,
                                max_connections=1)
    stuck = connect(address, rcvbuf=4096)
    port = stuck.getsockname()[1]
    request = b'{"jsonrpc":"2.0","method":"mesh.hello","id":1}\n'
    assert fill_without_reading(stuck, request) > 0
    went_quiet = time.monotonic()
    # From now on it sends nothing: idle after `idle` s, gone at most `close_timeout` s later.
    # Until its socket is gone it holds the one connection this gateway allows.
    refused_while_held = 0
    while gateway_holds(gw, port):
        assert time.monotonic() - went_quiet < idle + close_timeout + _WAIT, \
            "the gateway still holds the idle client's socket"
        probe = clients(address)
        try:
            answer = probe.recv(timeout=_WAIT)
        except (ConnectionResetError, AssertionError):
            continue  # it answered nothing and closed: checked again below
        finally:
            probe.close()
        if not gateway_holds(gw, port):
            break  # the probe raced the reset
        assert "error" in answer and error_code(answer) == jsonrpc.TOO_MANY_CONNECTIONS, \
            "a new connection was accepted while the idle one still held the only slot"
        refused_while_held += 1
    gone_after = time.monotonic() - went_quiet
    assert refused_while_held > 0
    assert gone_after >= idle * 0.9
    wait_until(lambda: "result" in clients(address).call("mesh.hello"), _WAIT,
               "a new connection to be accepted once the idle one is gone")
    stuck.close()
    print(f"idle client gone {gone_after:.2f} s after it went quiet "
          f"(idle_timeout {idle} s, close_timeout {close_timeout} s)")


def test_a_slow_consumer_dropped_leaves_nothing_queued_in_the_kernel(
    start_service: StartService, clients: Callable[[str], LineClient], mesh_client: Client
) -> None:
    gw, address = start_gateway(start_service, max_output=256 * 1024)
    stuck = connect(address, rcvbuf=4096)
    port = stuck.getsockname()[1]
    gw_port = int(address.rsplit(":", 1)[1])
    stuck.sendall(b'{"jsonrpc":"2.0","method":"mesh.subscribe","params":["jobs.big"],"id":1}\n')
    assert b"jobs.big" in stuck.recv(4096)
    wait_until(lambda: mesh_client.instances("gateway"), _WAIT, "the client to see the gateway")
    blob = "x" * 64 * 1024
    pushed = 0
    while gateway_holds(gw, port):
        mesh_client.publish("jobs.big", blob)
        pushed += 1
        assert pushed < 2000, "never dropped as a slow consumer"
    # Dropped: the gateway reset the connection, so the kernel keeps no orphan
    # socket still trying to deliver megabytes to a client that does not read.
    wait_until(lambda: not kernel_sockets(gw_port, port), 2.0,
               "the kernel to let go of the dropped client's socket")
    with pytest.raises(ConnectionResetError):
        while stuck.recv(1 << 20):
            pass
    stuck.close()


# -- defect 12: a hung gateway keeps receiving new connections -------------------------------


class Proxy:
    """``meshkit haproxy sync`` with its own HAProxy, in front of this test's gateways."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.settings = settings
        self.public = tcp_listener()
        self.port = self.public.getsockname()[1]
        self.paths = RuntimePaths.in_dir(directory / "run")
        self.toml = directory / "haproxy.toml"
        # The shipped configuration's check settings (configs/haproxy.toml).
        self.toml.write_text(f"""
[haproxy]
templates = "{REPO / 'haproxy'}"
hard_stop_after = "5s"
stop_timeout = 5.0
reconcile_interval = 0.5

[haproxy.check]
inter = "300ms"
fastinter = "100ms"
fall = 2
rise = 1

[[frontend]]
name = "stratum"
bind = "127.0.0.1:1"
service = "gateway"
listener = "stratum"
""")
        self.log_path = directory / "sync.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proxy:
        env = {**os.environ, **settings_env(self.settings), "MESHKIT_LOG_FORMAT": "text"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshkit", "haproxy", "sync", "--config", str(self.toml),
                 "--run-dir", str(self.paths.config_file.parent),
                 "--bind", f"stratum=fd@{self.public.fileno()}", "--haproxy", find_program("haproxy")],
                env=env, pass_fds=(self.public.fileno(),), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of the gateways' backend, by server name."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sync exited: {self.log_path.read_text(errors='replace')[-3000:]}")
        text = asyncio.run(RuntimeAPI(self.paths.stats_socket).execute("show stat"))
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "gateway.stratum"}

    def checked_up(self, name: str) -> bool:
        """Whether ``name`` is up with full health: its last check passed, and so on for ``fall`` checks."""
        row = self.servers().get(name)
        return (row is not None and row["status"] == "UP" and row["check_status"] in ("L4OK", "L7OK")
                and int(row["check_health"]) == int(row["check_rise"]) + int(row["check_fall"]) - 1)

    def down(self, name: str) -> bool:
        return self.servers()[name]["status"].startswith("DOWN")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        try:
            master = int(self.paths.pid_file.read_text().split()[0])
            os.kill(master, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        self.public.close()


@pytest.fixture
def proxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[Proxy]:
    runner = Proxy(mesh_settings, tmp_path)
    yield runner
    runner.stop()


def test_a_stopped_gateway_gets_no_new_connections_within_about_a_second(
    start_service: StartService, clients: Callable[[str], LineClient], proxy: Proxy
) -> None:
    hung, _ = start_gateway(start_service)
    healthy, _ = start_gateway(start_service)
    assert hung.record is not None and healthy.record is not None
    hung_name, healthy_name = server_name(hung.record.instance_id), server_name(healthy.record.instance_id)
    proxy.start()

    # Up with full health, so that one failed check is not enough to take it out.
    wait_until(lambda: proxy.checked_up(hung_name) and proxy.checked_up(healthy_name), _WAIT,
               "HAProxy to check both gateways up (full health)")
    os.kill(hung.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until(lambda: proxy.down(hung_name), 2.0,
                   "HAProxy to take the stopped gateway out of rotation")
        out_after = time.monotonic() - stopped
        for _ in range(20):
            client = clients(f"127.0.0.1:{proxy.port}")
            hello = client.call("mesh.hello", timeout=3.0)
            assert hello["result"]["gateway"] == healthy.record.instance_id
            client.close()
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    print(f"stopped gateway out of rotation {out_after:.2f} s after SIGSTOP")
    wait_until(lambda: proxy.checked_up(hung_name), _WAIT, "the resumed gateway to be checked up again")


# -- defect 14: lines that are not UTF-8 -----------------------------------------------------


def test_a_utf16_line_gets_a_parse_error_and_the_connection_stays(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    _, address = start_gateway(start_service)
    client = clients(address)
    # json.loads on bytes would take this for a valid request (it detects UTF-16).
    client.send('{"jsonrpc":"2.0","method":"mesh.hello","id":1}'.encode("utf-16-le") + b"\n")
    answer = client.recv()
    assert answer["id"] is None and error_code(answer) == jsonrpc.PARSE_ERROR
    assert "UTF-8" in answer["error"]["message"]
    assert "result" in client.call("mesh.hello")

