"""Settings: defaults, the TOML file, MESHKIT_* variables, precedence, validation."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest

from meshkit.config import DEFAULT_REDIS_URL, Settings
from meshkit.errors import ConfigError

CONFIG = """
[meshkit]
redis_url = "redis://10.0.0.5:6380/2"
namespace = "pool"
call_timeout = 2
heartbeat_interval = 0.5
ttl = 3.0
debug = true
port_min = 20000
port_max = 20100

[services.stratum]
log_level = "DEBUG"
call_timeout = "0.5"
flap_max_restarts = 7

[services.empty]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "meshkit.toml"
    path.write_text(CONFIG)
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = Settings.load(env={})
    assert s == Settings()
    assert s.redis_url == DEFAULT_REDIS_URL and DEFAULT_REDIS_URL.startswith("redis://127.0.0.1:")
    assert s.namespace == "meshkit"
    assert s.bind_host == "127.0.0.1"
    assert s.advertise_host == ""
    assert (s.port_min, s.port_max) == (0, 0)  # the kernel picks
    assert (s.heartbeat_interval, s.ttl, s.resync_interval) == (1.0, 5.0, 3.0)
    assert (s.call_timeout, s.publish_timeout) == (5.0, 1.0)
    assert s.max_message_size == 8 * 1024 * 1024
    assert s.drain_grace == 10.0
    assert s.handler_threads == 16
    assert (s.ping_after, s.dead_after) == (0.25, 0.75)
    assert s.debug is False
    assert (s.statsd_address, s.statsd_prefix) == ("", "meshkit")
    assert (s.log_format, s.log_level) == ("json", "INFO")
    assert s.run_dir == ".run"
    assert s.service_overrides == {}


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().namespace = "x"  # type: ignore[misc]


def test_file_meshkit_table(config_file: Path) -> None:
    s = Settings.load(config_file, env={})
    assert s.redis_url == "redis://10.0.0.5:6380/2"
    assert s.namespace == "pool"
    assert s.call_timeout == 2.0 and isinstance(s.call_timeout, float)
    assert (s.heartbeat_interval, s.ttl) == (0.5, 3.0)
    assert s.debug is True
    assert (s.port_min, s.port_max) == (20000, 20100)
    assert s.log_level == "INFO"  # not from [services.stratum]


def test_file_named_by_environment(config_file: Path) -> None:
    s = Settings.load(env={"MESHKIT_CONFIG": str(config_file)})
    assert s.namespace == "pool"


def test_explicit_path_beats_meshkit_config(config_file: Path, tmp_path: Path) -> None:
    other = _write(tmp_path, '[meshkit]\nnamespace = "other"\n')
    assert Settings.load(other, env={"MESHKIT_CONFIG": str(config_file)}).namespace == "other"


def test_file_without_meshkit_table(tmp_path: Path) -> None:
    s = Settings.load(_write(tmp_path, "[services.a]\nlog_level = 'DEBUG'\n"), env={})
    assert s.namespace == "meshkit"
    assert s.service_overrides == {"a": {"log_level": "DEBUG"}}


def test_environment_overrides() -> None:
    s = Settings.load(env={
        "MESHKIT_REDIS_URL": "unix:///tmp/redis.sock",
        "MESHKIT_NAMESPACE": "env",
        "MESHKIT_CALL_TIMEOUT": "1.5",
        "MESHKIT_HANDLER_THREADS": "4",
        "MESHKIT_DEBUG": "yes",
        "MESHKIT_STATSD_ADDRESS": "127.0.0.1:8125",
    })
    assert s.redis_url == "unix:///tmp/redis.sock"
    assert s.namespace == "env"
    assert s.call_timeout == 1.5
    assert s.handler_threads == 4 and isinstance(s.handler_threads, int)
    assert s.debug is True
    assert s.statsd_address == "127.0.0.1:8125"


def test_unrelated_environment_is_ignored() -> None:
    s = Settings.load(env={"MESHKIT_NO_SUCH_SETTING": "1", "NAMESPACE": "x",
                           "MESHKIT_SERVICE_OVERRIDES": "{}", "meshkit_namespace": "lower"})
    assert s == Settings()


def test_precedence_default_file_env_overrides(config_file: Path) -> None:
    env = {"MESHKIT_NAMESPACE": "from-env", "MESHKIT_CALL_TIMEOUT": "9"}
    s = Settings.load(config_file, env=env, call_timeout=0.1)
    assert s.redis_url == "redis://10.0.0.5:6380/2"  # file beats default
    assert s.namespace == "from-env"  # env beats file
    assert s.call_timeout == 0.1  # keyword beats env
    assert s.publish_timeout == 1.0  # default when nobody says otherwise


def test_overrides_are_coerced_and_validated() -> None:
    assert Settings.load(env={}, port_min="10", port_max=20).port_min == 10
    with pytest.raises(ConfigError, match="namespace"):
        Settings.load(env={}, namespace="a:b")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_bool_coercion(raw: str, expected: bool) -> None:
    assert Settings.load(env={"MESHKIT_DEBUG": raw}).debug is expected


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"MESHKIT_DEBUG": "maybe"}, "debug"),
        ({"MESHKIT_PORT_MIN": "ten"}, "port_min"),
        ({"MESHKIT_PORT_MIN": "1.5"}, "port_min"),
        ({"MESHKIT_TTL": "soon"}, "ttl"),
        ({"MESHKIT_MAX_MESSAGE_SIZE": ""}, "max_message_size"),
    ],
)
def test_bad_values_are_config_errors(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.load(env=env)


def test_toml_values_of_the_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="handler_threads"):
        Settings.load(_write(tmp_path, '[meshkit]\nhandler_threads = [1]\n'), env={})


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:7000", "localhost:7000", "", "127.0.0.1", "tcp://127.0.0.1:7000"],
)
def test_bad_redis_url(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        Settings.load(env={"MESHKIT_REDIS_URL": url})


@pytest.mark.parametrize(
    "url", ["redis://h:1/0", "rediss://user:pw@h:6380/1", "unix:///run/redis.sock?db=1"]
)
def test_good_redis_urls(url: str) -> None:
    assert Settings.load(env={}, redis_url=url).redis_url == url


@pytest.mark.parametrize("namespace", ["", "a:b", ":"])
def test_bad_namespace(namespace: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        Settings.load(env={"MESHKIT_NAMESPACE": namespace})


@pytest.mark.parametrize(
    ("heartbeat", "ttl"), [(5.0, 5.0), (6.0, 5.0), (0.0, 5.0), (-1.0, 5.0)]
)
def test_heartbeat_must_be_positive_and_below_ttl(heartbeat: float, ttl: float) -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        Settings.load(env={}, heartbeat_interval=heartbeat, ttl=ttl)


@pytest.mark.parametrize(
    ("low", "high"), [(10, 0), (0, 10), (20, 10), (1, 65536), (-1, 5)]
)
def test_bad_port_range(low: int, high: int) -> None:
    with pytest.raises(ConfigError, match="port_min"):
        Settings.load(env={}, port_min=low, port_max=high)


def test_good_port_range() -> None:
    s = Settings.load(env={}, port_min=1, port_max=65535)
    assert (s.port_min, s.port_max) == (1, 65535)
    assert Settings.load(env={}, port_min=5000, port_max=5000).port_max == 5000


def test_bad_log_format() -> None:
    with pytest.raises(ConfigError, match="log_format"):
        Settings.load(env={"MESHKIT_LOG_FORMAT": "xml"})


def test_max_message_size_floor() -> None:
    with pytest.raises(ConfigError, match="max_message_size"):
        Settings.load(env={}, max_message_size=1023)
    assert Settings.load(env={}, max_message_size=1024).max_message_size == 1024


def test_unknown_keys_in_meshkit_table(tmp_path: Path) -> None:
    path = _write(tmp_path, '[meshkit]\nnamespace = "x"\ncall_timout = 3\nzzz = 1\n')
    with pytest.raises(ConfigError, match=r"unknown settings \['call_timout', 'zzz'\]"):
        Settings.load(path, env={})


def test_meshkit_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="table"):
        Settings.load(_write(tmp_path, "meshkit = 1\n"), env={})


def test_services_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="services"):
        Settings.load(_write(tmp_path, 'services = "none"\n'), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(tmp_path / "absent.toml", env={})


def test_missing_file_named_by_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        Settings.load(env={"MESHKIT_CONFIG": str(tmp_path / "absent.toml")})


def test_malformed_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(_write(tmp_path, "[meshkit\nnamespace = \n"), env={})


def test_invalid_file_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        Settings.load(_write(tmp_path, "[meshkit]\nheartbeat_interval = 9\n"), env={})


def test_for_service(config_file: Path) -> None:
    base = Settings.load(config_file, env={})
    s = base.for_service("stratum")
    assert s.log_level == "DEBUG"
    assert s.call_timeout == 0.5 and isinstance(s.call_timeout, float)
    assert s.namespace == "pool"  # everything else from the base
    assert s.service_overrides == base.service_overrides
    assert base.log_level == "INFO"  # the base is unchanged


def test_for_service_without_a_table_is_the_same_object(config_file: Path) -> None:
    base = Settings.load(config_file, env={})
    assert base.for_service("other") is base
    assert base.for_service("empty") is base


def test_for_service_ignores_options_that_are_not_settings(tmp_path: Path) -> None:
    base = Settings.load(_write(tmp_path, "[services.a]\nflap_max_restarts = 3\n"), env={})
    assert base.for_service("a") is base
    assert base.service_option("a", "flap_max_restarts", 5) == 3


def test_service_option(config_file: Path) -> None:
    base = Settings.load(config_file, env={})
    assert base.service_option("stratum", "flap_max_restarts", 5) == 7
    assert base.service_option("stratum", "absent", "dflt") == "dflt"
    assert base.service_option("other", "flap_max_restarts", 5) == 5


def test_for_service_validates(tmp_path: Path) -> None:
    base = Settings.load(_write(tmp_path, "[services.a]\nttl = 0.5\n"), env={})
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        base.for_service("a")


def test_for_service_coercion_errors(tmp_path: Path) -> None:
    base = Settings.load(_write(tmp_path, "[services.a]\ndebug = 'perhaps'\n"), env={})
    with pytest.raises(ConfigError, match="debug"):
        base.for_service("a")


def test_replace_validates() -> None:
    s = Settings().replace(namespace="other", call_timeout=1.0)
    assert (s.namespace, s.call_timeout) == ("other", 1.0)
    with pytest.raises(ConfigError):
        Settings().replace(namespace="a:b")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"advertise_host": "mesh.example", "bind_host": "0.0.0.0"}, "mesh.example"),
        ({"bind_host": "10.1.2.3"}, "10.1.2.3"),
        ({"bind_host": "0.0.0.0"}, "fqdn.test"),
        ({"bind_host": "::"}, "fqdn.test"),
        ({"bind_host": "*"}, "fqdn.test"),
    ],
)
def test_advertised_host(
    changes: dict[str, Any], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "fqdn.test")
    assert Settings.load(env={}, **changes).advertised_host == expected
