"""HAProxy and the sync process against the real ``haproxy`` binary and a real Redis.

The public frontend is a listening socket this test binds on port 0 and hands
down (``--bind stratum=fd@N``); behind it, "gateways" are plain TCP servers
that greet every connection with their name, registered as fake ``gateway``
records. Nothing uses a fixed port, and every wait is for a positive signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from haproxykit import REPO, WAIT, FakeRegistry, Gateway, Sync, alive, greeting, held, running_sync

from meshkit import Settings
from meshkit.haproxy.process import REAP_TIMEOUT, stop_haproxy
from meshkit.haproxy.sync import CANCEL_WAIT, REGISTRY_CLOSE_TIMEOUT
from meshkit.record import DRAINING
from meshkit.testing import RedisServer, find_program, settings_env, tcp_listener, wait_until

pytestmark = pytest.mark.integration

# The sync's own stop (it leaves HAProxy running), plus interpreter exit and a noisy machine.
SYNC_STOP_BUDGET = CANCEL_WAIT + REGISTRY_CLOSE_TIMEOUT + 2.0


@pytest.fixture
def sync(mesh_settings: Settings, tmp_path: Path) -> Iterator[Sync]:
    with running_sync(mesh_settings, tmp_path) as runner:
        yield runner


def test_render_check_passes_with_servers(
    mesh_settings: Settings, registry: FakeRegistry, gateways: Callable[[str], Gateway], tmp_path: Path
) -> None:
    gw = gateways("gwrender1")
    registry.put(gw.record())
    runner = Sync(mesh_settings, tmp_path, tcp_listener())
    out = subprocess.run(
        [sys.executable, "-m", "meshkit", "haproxy", "render", "--check", "--config", str(runner.toml),
         "--run-dir", str(tmp_path / "run"), "--bind", "stratum=fd@99", "--haproxy", find_program("haproxy")],
        env=dict(os.environ, **settings_env(mesh_settings)), capture_output=True, text=True, cwd=REPO, timeout=30,
    )
    runner.public.close()
    assert out.returncode == 0, out.stderr
    assert "bind fd@99" in out.stdout
    assert f"server gwrender1 {gw.address} check inter 500ms fall 2 rise 1" in out.stdout


def test_servers_follow_the_registry(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    gw1, gw2 = gateways("gwone"), gateways("gwtwo")
    registry.put(gw1.record())
    sync.start()
    wait_until(lambda: greeting(sync.port) == "gwone", WAIT, "a connection through haproxy to reach gwone")

    # A second instance takes connections within about a second (leastconn:
    # with one connection held on gwone, the next goes to gwtwo).
    first, name = held(sync.port)
    assert name == "gwone"
    registry.put(gw2.record())
    started = time.monotonic()
    wait_until(lambda: "gwtwo" in sync.servers() and sync.servers()["gwtwo"].up, WAIT, "gwtwo to be added")
    assert greeting(sync.port) == "gwtwo"
    assert time.monotonic() - started < 2.0
    assert sync.servers()["gwtwo"].health_enabled

    # Draining: no new connections, the existing one goes on.
    registry.put(gw1.record(DRAINING))
    wait_until(lambda: sync.servers()["gwone"].draining, WAIT, "gwone to be draining")
    assert {greeting(sync.port) for _ in range(6)} == {"gwtwo"}
    first.sendall(b"still here")
    assert first.recv(100) == b"still here"

    # Gone (a record also disappears when a healthy gateway merely lost
    # Redis, so its clients must not be cut): in maintenance, the delete
    # refused and retried round after round while its connection lasts,
    # deleted once that connection closed.
    registry.delete(gw1.record())
    wait_until(lambda: sync.servers()["gwone"].in_maintenance, WAIT, "gwone to be in maintenance")
    wait_until(lambda: "remove gateway.stratum/gwone still refused" in sync.log(), WAIT,
               "sync to retry deleting gwone")
    first.settimeout(3.0)
    for n in range(3):
        first.sendall(b"ping %d" % n)
        assert first.recv(100) == b"ping %d" % n
    assert "gwone" in sync.servers()
    assert {greeting(sync.port) for _ in range(4)} == {"gwtwo"}
    first.close()
    wait_until(lambda: "gwone" not in sync.servers(), WAIT, "gwone to be deleted from haproxy")
    assert {greeting(sync.port) for _ in range(4)} == {"gwtwo"}
    assert "shutdown sessions" not in sync.log()
    assert sync.alive()


def test_killed_master_is_restarted_with_its_servers(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    gw1, gw2, gw3 = gateways("gwkill1"), gateways("gwkill2"), gateways("gwkill3")
    sync.start()
    registry.put(gw1.record())
    registry.put(gw2.record())
    registry.put(gw3.record(DRAINING))
    wait_until(lambda: set(sync.servers()) == {"gwkill1", "gwkill2", "gwkill3"}, WAIT, "the servers to be added")
    old = sync.master_pid()
    assert old is not None

    os.kill(old, signal.SIGKILL)
    wait_until(lambda: sync.master_pid() not in (None, old), WAIT, "sync to start a new haproxy master")

    def restored() -> bool:
        servers = sync.servers()
        taking = {n for n, s in servers.items() if s.up and not s.in_maintenance and not s.draining}
        return taking == {"gwkill1", "gwkill2"} and servers["gwkill3"].draining
    # The new master starts from a configuration listing every server (the
    # draining one in maintenance at first, then set to drain).
    wait_until(restored, WAIT, "the new haproxy to have its servers back in their states")
    conns = [held(sync.port) for _ in range(4)]
    assert {name for _, name in conns} == {"gwkill1", "gwkill2"}
    for conn, _ in conns:
        conn.close()
    assert sync.alive()


def test_reload_refuses_no_connection(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    gw1, gw2 = gateways("gwreload1"), gateways("gwreload2")
    registry.put(gw1.record())
    registry.put(gw2.record())
    sync.start()
    wait_until(lambda: len([s for s in sync.servers().values() if s.up and not s.in_maintenance]) == 2,
               WAIT, "both servers up")

    ok: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                name = greeting(sync.port)
                (ok if name else failures).append(name or "closed without a greeting")
            except OSError as exc:
                failures.append(repr(exc))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        wait_until(lambda: len(ok) > 50, WAIT, "connections to flow")
        # A structural change (a timeout) makes sync render, check and reload.
        sync.write_config('[haproxy.timeouts]\nqueue = "6s"')
        assert sync.process is not None
        sync.process.send_signal(signal.SIGHUP)
        wait_until(lambda: sync.reloads() >= 1, WAIT, "haproxy to reload")
        after = len(ok)
        wait_until(lambda: len(ok) > after + 200, WAIT, "connections to flow after the reload")
    finally:
        stop.set()
        thread.join(10)
    assert failures == []
    assert set(ok) == {"gwreload1", "gwreload2"}
    assert "queue 6s" in sync.paths.config_file.read_text()
    # The servers were in the rendered configuration, and are still there.
    assert set(sync.servers()) == {"gwreload1", "gwreload2"}


def test_sigterm_exits_zero_and_leaves_haproxy_serving(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    gw = gateways("gwterm")
    registry.put(gw.record())
    sync.start()
    wait_until(lambda: greeting(sync.port) == "gwterm", WAIT, "a connection to reach gwterm")
    conn, _ = held(sync.port)
    master = sync.master_pid()
    assert master is not None
    code, took = sync.terminate()
    assert code == 0
    assert took < SYNC_STOP_BUDGET, sync.log()
    assert alive(master) and greeting(sync.port) == "gwterm"
    conn.sendall(b"still here")
    assert conn.recv(100) == b"still here"
    conn.close()
    assert stop_haproxy(sync.paths.config_file.parent, 5.0) == "soft"
    assert not alive(master)


def test_stop_with_clients_connected_stays_within_its_timeout(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    # A soft stop cannot finish while a client stays connected (hard-stop-after
    # is longer than the budget): HAProxy is stopped hard within the timeout.
    sync.hard_stop_after = "1h"
    sync.write_config()
    gw = gateways("gwbudget")
    registry.put(gw.record())
    sync.start()
    wait_until(sync.workers, WAIT, "the master CLI to list the worker")
    conn, name = held(sync.port)
    assert name == "gwbudget"
    master, workers = sync.master_pid(), sync.workers()
    assert master is not None
    assert sync.stop() == 0

    started = time.monotonic()
    assert stop_haproxy(sync.paths.config_file.parent, 3.0) == "hard"
    assert time.monotonic() - started < 3.0 + REAP_TIMEOUT + 1.0
    assert not alive(master) and not any(alive(pid) for pid in workers)
    conn.settimeout(3.0)
    try:
        assert conn.recv(100) == b""
    except ConnectionResetError:
        pass
    conn.close()


def test_sigterm_during_a_stuck_reload_and_stop_of_a_stuck_haproxy_stay_within_budget(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    gw = gateways("gwstuck")
    registry.put(gw.record())
    sync.start()
    wait_until(lambda: greeting(sync.port) == "gwstuck", WAIT, "a connection to reach gwstuck")
    wait_until(lambda: "haproxy is up" in sync.log(), WAIT, "sync to see haproxy up")
    wait_until(sync.workers, WAIT, "the master CLI to list the worker")
    master, workers = sync.master_pid(), sync.workers()
    assert master is not None
    assert sync.process is not None

    # A master that does not answer: the reload hangs, and it ignores the
    # soft and the hard stop (both signals stay pending while it is stopped).
    os.kill(master, signal.SIGSTOP)
    sync.write_config('[haproxy.timeouts]\nqueue = "6s"')
    sync.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloading haproxy" in sync.log(), WAIT, "sync to start reloading")

    code, took = sync.terminate()
    assert code == 0
    assert took < SYNC_STOP_BUDGET, sync.log()
    started = time.monotonic()
    assert stop_haproxy(sync.paths.config_file.parent, 3.0) == "killed"
    assert time.monotonic() - started < 3.0 + REAP_TIMEOUT + 1.0
    assert not alive(master) and not any(alive(pid) for pid in workers)


def test_redis_outage_keeps_servers_and_converges_after(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway], redis_server: RedisServer
) -> None:
    gw1, gw2 = gateways("gwredis1"), gateways("gwredis2")
    registry.put(gw1.record())
    sync.start()
    wait_until(lambda: greeting(sync.port) == "gwredis1", WAIT, "a connection to reach gwredis1")
    try:
        redis_server.kill()
        wait_until(lambda: "registry unreachable" in sync.log(), WAIT, "sync to notice the outage")
        assert {greeting(sync.port) for _ in range(4)} == {"gwredis1"}
        assert set(sync.servers()) == {"gwredis1"}
    finally:
        redis_server.start()
    # The restarted Redis is empty: owners write their records again (here by
    # hand), and a new instance shows up as usual.
    registry.put(gw1.record())
    registry.put(gw2.record())
    wait_until(lambda: set(sync.servers()) == {"gwredis1", "gwredis2"}, WAIT, "sync to converge after the outage")
    assert sync.alive()


def test_attach_drives_a_running_haproxy(
    sync: Sync, registry: FakeRegistry, gateways: Callable[[str], Gateway]
) -> None:
    gw = gateways("gwattach")
    paths = sync.paths
    rendered = subprocess.run(sync.meshkit_haproxy("render", "-o", str(paths.config_file)),
                              env={**os.environ, **settings_env(sync.settings)}, cwd=REPO, timeout=30,
                              capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    fd = sync.public.fileno()
    haproxy = subprocess.Popen(
        [find_program("haproxy"), "-W", "-S", str(paths.master_socket), "-p", str(paths.pid_file),
         "-f", str(paths.config_file)],
        pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        sync.start("--attach")
        registry.put(gw.record())
        wait_until(lambda: greeting(sync.port) == "gwattach", WAIT, "a connection to reach gwattach")
        assert sync.master_pid() == haproxy.pid
        assert sync.reloads() == 0  # the structure it found was already right
        assert sync.stop() == 0
        assert haproxy.poll() is None  # not ours to stop
        assert greeting(sync.port) == "gwattach"
    finally:
        haproxy.kill()
        haproxy.wait(10)
