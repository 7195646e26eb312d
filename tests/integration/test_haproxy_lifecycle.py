"""HAProxy outlives its sync process: clients keep their connections while the sync restarts.

Clients are line clients through HAProxy to a real gateway (and the
``gwprobe`` backend behind it); a :class:`~haproxykit.ConnectLoop` opens new
connections in a tight loop the whole time. A sync that is SIGKILLed or
SIGTERMed leaves HAProxy serving; the next sync attaches to the HAProxy it
finds in the run directory and follows the registry again. Only
``meshkit haproxy stop`` (what ``meshkit down`` calls) stops HAProxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from haproxykit import (
    REPO,
    WAIT,
    ConnectLoop,
    FakeRegistry,
    Gateway,
    Sync,
    alive,
    kill_haproxy,
    reserve_port,
)
from lineclient import LineClient

from meshkit import Settings
from meshkit.haproxy.process import masters_running
from meshkit.haproxy.render import RuntimePaths
from meshkit.registry import read_records
from meshkit.stack.control import CircusControl
from meshkit.stack.processes import stack_processes, terminate
from meshkit.testing import ServiceProcess, find_program, settings_env, tcp_listener, wait_until

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
PROBE = "tests.integration.services.gwprobe:GatewayProbe"
CLIENTS = 8
FOLLOW_WITHIN = 3.0  # seconds from a new sync's launch to its first new server (about 1 s; the machine is noisy)

StartService = Callable[..., list[ServiceProcess]]


@pytest.fixture
def public() -> Iterator[socket.socket]:
    sock = tcp_listener()
    yield sock
    sock.close()


@pytest.fixture
def syncs(mesh_settings: Settings, tmp_path: Path, public: socket.socket) -> Iterator[Callable[..., Sync]]:
    """``syncs(bind=None, listener=public)``: a new sync on the same run directory; all stopped, HAProxy too."""
    made: list[Sync] = []

    def make(bind: str | None = None, listener: socket.socket | None = None) -> Sync:
        made.append(Sync(mesh_settings, tmp_path, listener or public, bind=bind))
        made[-1].hard_stop_after = "1h"  # a client cut here is a client cut, not a timeout
        made[-1].write_config()
        return made[-1]

    yield make
    for runner in made:
        runner.stop()
    if made:
        kill_haproxy(made[0].paths)


@pytest.fixture
def line_clients() -> Iterator[Callable[[int, int], list[LineClient]]]:
    """``line_clients(port, count)``: clients through HAProxy, each with one answered call; closed at the end."""
    made: list[LineClient] = []

    def connect(port: int, count: int) -> list[LineClient]:
        clients = [LineClient(f"127.0.0.1:{port}") for _ in range(count)]
        made.extend(clients)
        for n, client in enumerate(clients):
            assert client.call("gwprobe.echo", [n])["result"] == n
        return clients

    yield connect
    for client in made:
        client.close()


def still_connected(clients: list[LineClient]) -> list[int]:
    """Indexes of the clients whose call is answered on their old connection (all of them, or some were cut)."""
    answered = []
    for n, client in enumerate(clients):
        try:
            if client.call("gwprobe.echo", [n + 100], timeout=5.0)["result"] == n + 100:
                answered.append(n)
        except (OSError, AssertionError):
            pass
    return answered


def backend_up(sync: Sync, name: str) -> bool:
    server = sync.servers().get(name)
    return server is not None and server.up and not server.in_maintenance


def start_mesh(start_service: StartService) -> str:
    """The gwprobe backend and one real gateway; return the gateway's instance id."""
    start_service(PROBE)
    [gateway] = start_service(GATEWAY)
    assert gateway.record is not None
    return gateway.record.instance_id


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_haproxy_outlives_its_sync_and_a_new_sync_attaches(
    sig: int, syncs: Callable[..., Sync], start_service: StartService, registry: FakeRegistry,
    gateways: Callable[[str], Gateway], line_clients: Callable[[int, int], list[LineClient]],
) -> None:
    instance = start_mesh(start_service)
    first = syncs().start()
    wait_until(lambda: backend_up(first, instance), WAIT, "the gateway to be a server")
    clients = line_clients(first.port, CLIENTS)
    master = first.master_pid()
    loop = ConnectLoop(first.port).start()
    try:
        assert first.process is not None
        first.process.send_signal(sig)
        assert first.process.wait(30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        # No sync now: HAProxy goes on serving with the servers it has.
        loop.flowing()
        assert first.master_pid() == master
        late = gateways("gwlate")
        registry.put(late.record())

        second = syncs()
        launched = time.monotonic()
        second.start()
        wait_until(lambda: backend_up(second, "gwlate"), WAIT, "the new sync to add gwlate")
        took = time.monotonic() - launched
        loop.flowing()
    finally:
        loop.stop()
    assert loop.failures == [], second.log() if loop.failures else ""
    assert loop.slowest < 2.0, f"a connection waited {loop.slowest:.1f}s"
    assert still_connected(clients) == list(range(CLIENTS))
    assert second.master_pid() == master, "the new sync must attach to the running HAProxy, not replace it"
    assert took < FOLLOW_WITHIN, f"the new sync followed the registry {took:.2f}s after its launch"
    print(f"\n{signal.Signals(sig).name}: new sync followed the registry {took:.2f}s after launch; "
          f"{loop.ok} connections, slowest {loop.slowest * 1000:.0f} ms")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_standalone_restart_with_host_port_refuses_nothing(
    sig: int, syncs: Callable[..., Sync], start_service: StartService, registry: FakeRegistry,
    gateways: Callable[[str], Gateway], line_clients: Callable[[int, int], list[LineClient]],
) -> None:
    # --bind host:port: HAProxy binds the port itself. The test reserves a
    # kernel-chosen port (SO_REUSEPORT, never listening) until HAProxy has it.
    reservation = reserve_port()
    port = reservation.getsockname()[1]
    try:
        instance = start_mesh(start_service)
        first = syncs(bind=f"127.0.0.1:{port}")
        first.port = port
        first.start()
        wait_until(lambda: backend_up(first, instance), WAIT, "the gateway to be a server")
    finally:
        reservation.close()
    clients = line_clients(port, 2)
    master = first.master_pid()
    loop = ConnectLoop(port).start()
    try:
        assert first.process is not None
        first.process.send_signal(sig)
        first.process.wait(30)
        loop.flowing()
        late = gateways("gwlate")
        registry.put(late.record())
        second = syncs(bind=f"127.0.0.1:{port}")
        second.port = port
        second.start()
        # Its first round is done once it follows the registry change.
        wait_until(lambda: backend_up(second, "gwlate"), WAIT, "the new sync to add gwlate")
        loop.flowing()
        assert second.alive()
    finally:
        loop.stop()
    assert loop.failures == []
    assert still_connected(clients) == [0, 1]
    assert second.master_pid() == master


def test_haproxy_stop_stops_it_softly(syncs: Callable[..., Sync], start_service: StartService) -> None:
    instance = start_mesh(start_service)
    sync = syncs().start()
    wait_until(lambda: backend_up(sync, instance), WAIT, "the gateway to be a server")
    master = sync.master_pid()
    assert master is not None
    assert sync.stop() == 0
    assert alive(master), "SIGTERM to the sync must leave HAProxy running"
    done = subprocess.run(
        [sys.executable, "-m", "meshkit", "haproxy", "stop", "--run-dir", str(sync.paths.config_file.parent),
         "--timeout", "5"],
        env={**os.environ, **settings_env(sync.settings)}, cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert not alive(master)
    assert "stopped softly" in done.stdout, done.stdout + done.stderr


def test_a_new_sync_with_other_descriptor_numbers_takes_haproxy_over_refusing_nothing(
    syncs: Callable[..., Sync], start_service: StartService, public: socket.socket,
    line_clients: Callable[[int, int], list[LineClient]],
) -> None:
    # The next sync may get the same listening socket under another number
    # (fd@N): the running master does not hold it there, so the new sync
    # starts a master that does, then soft-stops the old one.
    instance = start_mesh(start_service)
    first = syncs().start()
    wait_until(lambda: backend_up(first, instance), WAIT, "the gateway to be a server")
    clients = line_clients(first.port, 2)
    old_master = first.master_pid()
    loop = ConnectLoop(first.port).start()
    other = socket.socket(fileno=os.dup(public.fileno()))
    try:
        assert first.stop() == 0
        second = syncs(listener=other).start()
        wait_until(lambda: second.master_pid() not in (None, old_master), WAIT, "a new haproxy master")
        wait_until(lambda: backend_up(second, instance), WAIT, "the gateway to be a server of the new master")
        assert old_master is not None
        loop.flowing()
        # The old master finishes its clients' connections (soft stop), then goes.
        assert still_connected(clients) == [0, 1]
        for client in clients:
            client.close()
        wait_until(lambda: not alive(old_master), WAIT, "the old master to leave once its clients left")
        loop.flowing()
        second.stop()
    finally:
        loop.stop()
        other.close()
    assert loop.failures == []
    assert "lacks a listening socket" in second.log() or "soft-stopping the previous haproxy master" in second.log()



def test_a_sync_killed_between_writing_and_reloading_is_followed_by_a_reload(
    syncs: Callable[..., Sync], registry: FakeRegistry, gateways: Callable[[str], Gateway],
) -> None:
    gw = gateways("gwwrite")
    registry.put(gw.record())
    first = syncs().start()
    wait_until(lambda: backend_up(first, "gwwrite"), WAIT, "gwwrite to be a server")
    assert first.process is not None
    first.process.kill()
    first.process.wait(10)
    # What a sync leaves when killed after writing a new structure, before reloading it.
    first.write_config('[haproxy.timeouts]\nqueue = "6s"')
    rendered = subprocess.run(first.meshkit_haproxy("render", "-o", str(first.paths.config_file)),
                              env={**os.environ, **settings_env(first.settings)}, cwd=REPO, timeout=30,
                              capture_output=True, text=True, pass_fds=(first.public.fileno(),))
    assert rendered.returncode == 0, rendered.stderr
    assert first.reloads() == 0

    second = syncs()
    second.write_config('[haproxy.timeouts]\nqueue = "6s"')
    second.start()
    wait_until(lambda: second.reloads() >= 1, WAIT, "the new sync to reload the structure haproxy does not run")
    wait_until(lambda: backend_up(second, "gwwrite"), WAIT, "gwwrite to be a server after the reload")



def test_a_takeover_cut_short_leaves_no_second_master(
    syncs: Callable[..., Sync], registry: FakeRegistry, gateways: Callable[[str], Gateway],
    public: socket.socket,
) -> None:
    # A sync killed while taking HAProxy over leaves two masters running one
    # configuration; the next sync keeps one (the one whose worker answers on
    # the stats socket) and soft-stops the other, refusing nothing meanwhile.
    registry.put(gateways("gwstale").record())
    first = syncs().start()
    wait_until(lambda: backend_up(first, "gwstale"), WAIT, "gwstale to be a server")
    assert first.process is not None
    first.process.kill()
    first.process.wait(10)
    paths = first.paths
    stale = subprocess.Popen(
        [find_program("haproxy"), "-W", "-S", str(paths.master_socket), "-p", str(paths.pid_file),
         "-f", str(paths.config_file)],
        pass_fds=(public.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until(lambda: len(masters_running(paths.config_file)) == 2, WAIT, "a second master to run")
        loop = ConnectLoop(first.port, request=b"hello\n").start()
        try:
            second = syncs().start()
            wait_until(lambda: len(masters_running(paths.config_file)) == 1, WAIT, "the new sync to leave one master")
            registry.put(gateways("gwafter").record())
            wait_until(lambda: backend_up(second, "gwafter"), WAIT, "the new sync to drive the one left")
            loop.flowing()
        finally:
            loop.stop()
        assert loop.failures == []
        assert masters_running(paths.config_file) == [second.master_pid()]
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait(10)


# -- under Circus: the stack's own circus.ini ------------------------------------


def meshkit(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshkit", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """``meshkit up --daemon`` on the project's circus.ini in a run directory of its own; ``meshkit down`` after."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    env.update({
        "MESHKIT_RUN_DIR": str(run_dir), "MESHKIT_HOME": str(REPO),
        "MESHKIT_CONFIG": str(REPO / "configs" / "meshkit.toml"),
        "MESHKIT_NAMESPACE": "hl" + uuid.uuid4().hex[:8],
        "MESHKIT_STRATUM_HOST": "127.0.0.1", "MESHKIT_STRATUM_PORT": "0",
        "MESHKIT_HEARTBEAT_INTERVAL": "0.3", "MESHKIT_TTL": "2", "MESHKIT_RESYNC_INTERVAL": "0.5",
        "MESHKIT_DRAIN_GRACE": "3", "MESHKIT_GATEWAY_DRAIN_GRACE": "2",
    })
    up = meshkit("up", "--daemon", "--circus-ini", str(REPO / "circus.ini"), "--run-dir", str(run_dir), env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env["MESHKIT_REDIS_URL"] = f"unix://{run_dir}/redis.sock"
        yield env, run_dir
    finally:
        meshkit("down", "--run-dir", str(run_dir), env=env)
        terminate(stack_processes(str(run_dir)), grace=5)


def test_circus_restarting_or_losing_the_sync_watcher_cuts_no_client(
    stack: tuple[dict[str, str], Path],
) -> None:
    env, run_dir = stack
    control = CircusControl(f"ipc://{run_dir}/circus.sock", str(run_dir / "control.lock"))
    port = int(control.sockets()["stratum"].rsplit(":", 1)[1])
    view = Sync(Settings.load(env=env), run_dir.parent, tcp_listener())  # only to read HAProxy's state
    view.public.close()
    view.paths = RuntimePaths.in_dir(run_dir)
    gateways = {r.instance_id for r in read_records(view.settings, "gateway")}
    wait_until(lambda: all(backend_up(view, g) for g in gateways), WAIT, "the gateways to be servers")
    clients = [LineClient(f"127.0.0.1:{port}") for _ in range(CLIENTS)]
    try:
        for client in clients:
            assert "result" in client.call("mining.stats")
        master = view.master_pid()
        loop = ConnectLoop(port).start()  # any answer counts (here "method not found")
        try:
            for how in ("restart", "kill -9"):
                [old] = control.pids("haproxy")
                if how == "restart":
                    control.call("restart", name="haproxy")
                else:
                    os.kill(old, signal.SIGKILL)
                wait_until(lambda old=old: control.pids("haproxy") not in ([], [old]), WAIT,
                           f"circus to {how} the sync")
                loop.flowing()
            # The new sync follows the registry: a third gateway becomes a server.
            assert meshkit("scale", "gateway", "3", "--run-dir", str(run_dir), env=env).returncode == 0
            wait_until(lambda: len(read_records(view.settings, "gateway")) == 3, 20, "a third gateway")
            [third] = {r.instance_id for r in read_records(view.settings, "gateway")} - gateways
            wait_until(lambda: backend_up(view, third), WAIT, "the third gateway to be a server")
            loop.flowing()
        finally:
            loop.stop()
        assert loop.failures == []
        assert loop.slowest < 2.0, f"a connection waited {loop.slowest:.1f}s"
        for client in clients:
            assert "result" in client.call("mining.stats")
        assert view.master_pid() == master
    finally:
        for client in clients:
            client.close()
    # Only meshkit down stops HAProxy, softly.
    down = meshkit("down", "--run-dir", str(run_dir), env=env)
    assert down.returncode == 0, down.stderr
    assert master is not None and not alive(master)


def test_the_test_kits_teardown_leaves_no_haproxy_behind(syncs: Callable[..., Sync]) -> None:
    """``kill_haproxy`` finds the HAProxy a test's sync started (it outlives the sync by design),
    so a suite leaves none running: before, only processes carrying the stack's marker were found,
    and every test-made HAProxy stayed."""
    sync = syncs().start()
    master = sync.master_pid()
    assert master is not None and alive(master)
    sync.stop()
    assert alive(master)  # HAProxy outlives its sync
    kill_haproxy(sync.paths)
    run_dir = str(sync.paths.config_file.parent)
    deadline = time.monotonic() + WAIT
    while masters_running(sync.paths.config_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(master)
    assert not [p for p in psutil.process_iter(["cmdline"])
                if any(run_dir in arg for arg in (p.info["cmdline"] or []))]
