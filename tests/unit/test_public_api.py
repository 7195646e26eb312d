"""The public surface: ``meshkit.__all__`` and the test kit are pinned here.

Changing either is an API change: update this file on purpose, never to make
a failure go away.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any

import pytest

import meshkit
import meshkit.testing

PUBLIC = [
    "AsyncClient",
    "BadArgumentsError",
    "BadRequestError",
    "CallContext",
    "CallError",
    "CallTimeoutError",
    "Client",
    "ClientClosedError",
    "ConfigError",
    "HandlerError",
    "InstanceRecord",
    "LostPeerError",
    "MeshError",
    "MessageTooLargeError",
    "NoInstanceError",
    "ProtocolError",
    "RefusedError",
    "RegistryUnreachableError",
    "RemoteError",
    "ResourceExhaustedError",
    "Service",
    "Settings",
    "UnknownConnectionError",
    "UnknownMethodError",
    "UnknownServiceError",
    "UnsupportedVersionError",
    "__version__",
    "current_call",
    "periodic",
    "rpc",
    "subscribe",
]

FIXTURES = {
    "redis_server": "session",
    "mesh_settings": "function",
    "start_service": "function",
    "mesh_client": "function",
    "host_network": "function",
}

# The names the test kit must keep exporting; its __all__ may grow (it is being
# extended), so this is a floor, not an exact pin.
TESTING_NAMES = [
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

def test_all_is_pinned() -> None:
    assert meshkit.__all__ == PUBLIC
    assert PUBLIC == sorted(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(meshkit, name) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from meshkit import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC


def test_version() -> None:
    assert isinstance(meshkit.__version__, str)
    assert meshkit.__version__.count(".") == 2


def test_public_objects_come_from_meshkit() -> None:
    for name in PUBLIC:
        obj = getattr(meshkit, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("meshkit."), name
            assert obj.__doc__, f"{name} needs a docstring"


def test_testing_exports() -> None:
    exported = meshkit.testing.__all__
    assert exported == TESTING_NAMES
    for name in exported:
        assert getattr(meshkit.testing, name) is not None, name


def _fixture_scope(obj: Any) -> str | None:
    """The scope of a pytest fixture object, or None if ``obj`` is not one.

    pytest has no public predicate for this; the marker's attribute name
    differs between pytest 8.3 and 8.4+, so both are looked up.
    """
    marker = getattr(obj, "_fixture_function_marker", None) or getattr(
        obj, "_pytestfixturefunction", None
    )
    return None if marker is None else str(marker.scope)


@pytest.mark.parametrize(("name", "scope"), FIXTURES.items())
def test_fixtures_are_defined_in_the_plugin(name: str, scope: str) -> None:
    obj = vars(meshkit.testing).get(name)
    assert obj is not None, f"meshkit.testing does not define fixture {name}"
    assert _fixture_scope(obj) == scope


def test_plugin_is_registered_as_an_entry_point() -> None:
    points = importlib.metadata.entry_points(group="pytest11")
    assert [p.value for p in points if p.name == "meshkit"] == ["meshkit.testing"]


def test_plugin_is_loaded_in_this_session(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.get_plugin("meshkit") is meshkit.testing
