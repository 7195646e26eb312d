"""meshkit's test kit, registered as a pytest plugin (entry point ``pytest11``).

Users test their services the way meshkit tests itself, against real
processes::

    def test_echo(start_service, mesh_client):
        start_service("services.echo:Echo")
        assert mesh_client.call("echo", "echo", 42) == 42

Fixtures:

``redis_server``
    A private ``redis-server`` on a unix socket (one per test session).
``mesh_settings``
    :class:`~meshkit.Settings` pointing at it, with a fresh namespace per test
    and short timings (heartbeat 0.3 s, TTL 2 s) so tests run quickly.
``start_service``
    ``start_service(target, count=1, env=None, settings=None) -> list[ServiceProcess]``:
    starts ``python -m meshkit run TARGET`` instances and returns once each
    is registered (and, if the test uses ``mesh_client``, once that client
    knows of them); every one still running is killed after the test.
``mesh_client``
    A blocking :class:`~meshkit.Client` on ``mesh_settings``.
``host_network``
    ``host_network(count) -> HostNetwork``: ``count`` hosts as network
    namespaces on one bridge, each with its own ``198.18.0.0/15`` address
    (:mod:`meshkit.testing.hosts`); run processes on them, cut and restore
    links; all removed after the test, passed or failed.

In-process, with no Redis and no subprocess (see ``docs/testing.md``):

:class:`ServiceHarness`
    Runs one service in this process and drives it: ``await h.call(...)``,
    ``await h.publish(...)``, ``h.clock.advance(seconds)``.
:class:`FakeClock`
    A :class:`meshkit.clock.Clock` whose time moves only on ``advance()``.
:class:`MemoryRegistry`
    A registry kept in memory, behind the interface a service uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from ..config import Settings
from ..registry import read_records
from .clock import FakeClock
from .harness import ServiceHarness
from .hosts import Host, HostNetwork, HostProcess, HostsUnavailableError
from .memory import MemoryRegistry
from .processes import (
    MissingProgramError,
    ProcessExitedError,
    RedisServer,
    ServiceProcess,
    find_program,
    settings_env,
    tcp_listener,
    wait_until,
)

if TYPE_CHECKING:
    from ..blocking import Client

__all__ = [
    "FakeClock",
    "Host",
    "HostNetwork",
    "HostProcess",
    "HostsUnavailableError",
    "MakeHosts",
    "MemoryRegistry",
    "MissingProgramError",
    "ProcessExitedError",
    "RedisServer",
    "ServiceHarness",
    "ServiceProcess",
    "StartService",
    "find_program",
    "read_records",
    "settings_env",
    "tcp_listener",
    "test_settings",
    "wait_until",
]

StartService = Callable[..., list[ServiceProcess]]
MakeHosts = Callable[[int], HostNetwork]


def test_settings(redis_url: str, **overrides: object) -> Settings:
    """Settings for a test: a fresh namespace and short timings."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "namespace": "t" + uuid.uuid4().hex[:10],
        "heartbeat_interval": 0.3,
        "ttl": 2.0,
        "resync_interval": 0.5,
        "drain_grace": 5.0,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings.load(None, {}, **values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test despite its name


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session (per-test namespaces keep tests apart)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def mesh_settings(redis_server: RedisServer) -> Settings:
    return test_settings(redis_server.url)


@pytest.fixture
def _mesh_clients() -> list[Client]:
    """The ``mesh_client`` of this test, if it asked for one (``start_service`` waits for it)."""
    return []


@pytest.fixture
def start_service(
    mesh_settings: Settings, tmp_path_factory: pytest.TempPathFactory, _mesh_clients: list[Client]
) -> Iterator[StartService]:
    started: list[ServiceProcess] = []
    log_dir = str(tmp_path_factory.mktemp("services"))

    def start(
        target: str,
        count: int = 1,
        env: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        args: tuple[str, ...] = (),
    ) -> list[ServiceProcess]:
        procs = [
            ServiceProcess(target, settings or mesh_settings, env=env, log_dir=log_dir, args=args)
            for _ in range(count)
        ]
        # Launch them all before waiting for any: interpreter start-up is most
        # of the cost, and the instances do not depend on each other.
        for proc in procs:
            started.append(proc)
            proc.spawn()
        for proc in procs:
            proc.wait_registered()
        # The records are in Redis, but a client learns of them a moment later
        # (pub/sub); a test calling at once must not get NoInstanceError.
        keys = {proc.record.key for proc in procs if proc.record is not None}
        namespace = (settings or mesh_settings).namespace
        for client in _mesh_clients:
            if client.settings.namespace == namespace:
                _wait_until_known(client, keys)
        return procs

    yield start
    for proc in started:
        proc.kill()


def _wait_until_known(client: Client, keys: set[str]) -> None:
    wait_until(lambda: keys <= {r.key for r in client.instances()}, 5.0,
               "mesh_client to see the new instances")


@pytest.fixture
def mesh_client(mesh_settings: Settings, _mesh_clients: list[Client]) -> Iterator[Client]:
    from ..blocking import Client

    client = Client(mesh_settings)
    _mesh_clients.append(client)
    yield client
    client.close()


@pytest.fixture
def host_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeHosts]:
    """``host_network(count)`` builds a :class:`HostNetwork`; every one is closed after the test.

    A machine without network namespaces raises :class:`HostsUnavailableError`
    (the test fails with the reason; it is not skipped).
    """
    networks: list[HostNetwork] = []

    def make(count: int) -> HostNetwork:
        net = HostNetwork.create(count, log_dir=str(tmp_path_factory.mktemp("hosts")))
        networks.append(net)
        return net

    yield make
    for net in networks:
        net.close()
