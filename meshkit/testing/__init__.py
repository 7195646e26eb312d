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
    ``start_service(target, count=1, env=None) -> list[ServiceProcess]``:
    starts ``python -m meshkit run TARGET`` instances and returns once each
    is registered; every one still running is killed after the test.
``mesh_client``
    A blocking :class:`~meshkit.Client` on ``mesh_settings``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

from ..config import Settings
from ..registry import read_records
from .processes import (
    MissingProgramError,
    RedisServer,
    ServiceProcess,
    find_program,
    settings_env,
    tcp_listener,
    wait_until,
)

if TYPE_CHECKING:
    from ..sync import Client

__all__ = [
    "MissingProgramError",
    "RedisServer",
    "ServiceProcess",
    "find_program",
    "read_records",
    "settings_env",
    "tcp_listener",
    "test_settings",
    "wait_until",
]

StartService = Callable[..., list[ServiceProcess]]


def test_settings(redis_url: str, **overrides: object) -> Settings:
    """Settings for a test: a fresh namespace and short timings."""
    values: dict[str, object] = {
        "redis_url": redis_url,
        "namespace": "t" + uuid.uuid4().hex[:10],
        "heartbeat_interval": 0.3,
        "ttl": 2.0,
        "resync_interval": 0.5,
        "drain_grace": 5.0,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings.load(env={}, **values)


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
def start_service(mesh_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartService]:
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
        for proc in procs:
            started.append(proc)
            proc.start()
        return procs

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def mesh_client(mesh_settings: Settings) -> Iterator[Client]:
    from ..sync import Client

    client = Client(mesh_settings)
    yield client
    client.close()
