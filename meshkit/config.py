"""Settings: one typed object built from defaults, a TOML file and ``MESHKIT_*`` variables.

Precedence, lowest first: the defaults below; the ``[meshkit]`` table of the
file named by ``MESHKIT_CONFIG`` (or the path given to :meth:`Settings.load`);
``MESHKIT_<FIELD>`` environment variables (for example ``MESHKIT_REDIS_URL``,
``MESHKIT_NAMESPACE``, ``MESHKIT_CALL_TIMEOUT``); keyword overrides. Nothing
is read at import time; a :class:`Settings` is passed to whatever needs it.

Per-service tables ``[services.<name>]`` in the same file hold settings that
differ by service (``log_level``, ``flap_max_restarts``, ...); read them with
:meth:`Settings.for_service`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

ENV_PREFIX = "MESHKIT_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # Redis's own default; `meshkit up` starts a private one instead


@dataclass(frozen=True)
class Settings:
    """Everything a meshkit process can be told. All durations are in seconds."""

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = "meshkit"
    bind_host: str = "127.0.0.1"
    advertise_host: str = ""  # empty: the bind host, or this host's name if binding a wildcard
    port_min: int = 0  # 0 and 0: let the kernel choose any free port
    port_max: int = 0
    heartbeat_interval: float = 1.0
    ttl: float = 5.0
    resync_interval: float = 3.0
    call_timeout: float = 5.0
    publish_timeout: float = 1.0
    max_message_size: int = 8 * 1024 * 1024
    # -- bounds on what remote peers can make an instance hold (docs/protocol.md, "Receiver limits").
    # Each request held counts its frame bytes plus a fixed allowance for its task and context.
    max_header_size: int = 64 * 1024  # a longer header frame is answered bad_request
    max_name_length: int = 256  # characters of a method, topic or service name; longer is bad_request
    max_calls_per_peer: int = 10_000  # calls being served for one connection; past it: overloaded
    max_call_bytes_per_peer: int = 64 * 1024 * 1024
    max_queued_pushes: int = 10_000  # pushes from one connection waiting for their handler
    max_queued_push_bytes: int = 32 * 1024 * 1024
    max_inflight: int = 100_000  # calls and pushes held by the whole instance, every connection together
    max_inflight_bytes: int = 256 * 1024 * 1024
    max_body_containers: int = 100_000  # arrays and maps one body may decode to; more is bad_request
    topic_cache_bytes: int = 1024 * 1024  # memory of the topic -> handlers lookup cache
    max_log_line: int = 16 * 1024  # characters of one log line, traceback included (a last line of defence)
    log_repeat_interval: float = 10.0  # a log line caused by remote input repeats at most this often
    drain_grace: float = 10.0
    handler_threads: int = 16
    ping_after: float = 0.25  # ZeroMQ heartbeat interval on each connection to a peer
    dead_after: float = 0.75  # no heartbeat answer (or no handshake) for this long: the peer is lost
    debug: bool = False  # send handler tracebacks to callers
    statsd_address: str = ""  # host:port; empty disables metrics
    statsd_prefix: str = "meshkit"
    log_format: str = "json"  # "json" or "text"
    log_level: str = "INFO"
    run_dir: str = ".run"
    service_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scheme = urlparse(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis_url must be redis://, rediss:// or unix://, got {self.redis_url!r}")
        if not self.namespace or ":" in self.namespace:
            raise ConfigError(f"namespace must be non-empty and contain no ':', got {self.namespace!r}")
        for name in ("heartbeat_interval", "ttl", "resync_interval", "call_timeout",
                     "publish_timeout", "drain_grace", "ping_after", "dead_after", "log_repeat_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.heartbeat_interval <= 0 or self.ttl <= self.heartbeat_interval:
            raise ConfigError("need 0 < heartbeat_interval < ttl")
        if (self.port_min, self.port_max) != (0, 0) and not 0 < self.port_min <= self.port_max < 65536:
            raise ConfigError("port_min..port_max must be a valid range, or both 0")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        if self.max_message_size < 1024:
            raise ConfigError("max_message_size must be at least 1024 bytes")
        self._check_limits()

    def _check_limits(self) -> None:
        minimums = {"max_header_size": 1024, "max_name_length": 1, "max_calls_per_peer": 1,
                    "max_call_bytes_per_peer": 1, "max_queued_pushes": 1, "max_queued_push_bytes": 1,
                    "max_inflight": 1, "max_inflight_bytes": 1,
                    "max_body_containers": 1024, "topic_cache_bytes": 0, "max_log_line": 1024}
        for name, least in minimums.items():
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ConfigError(f"{name} must be an integer of at least {least}, got {value!r}")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from file, environment and ``overrides`` (see module doc)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        file = path or env.get(ENV_PREFIX + "CONFIG")
        if file:
            try:
                data = tomllib.loads(Path(file).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {file}: {exc}") from None
            values.update(_check_keys(data.get("meshkit", {}), str(file)))
            services = data.get("services", {})
            if not isinstance(services, dict):
                raise ConfigError(f"{file}: [services] must be a table of tables")
            values["service_overrides"] = services
        types = _field_types()
        for name in types:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and name != "service_overrides":
                values[name] = raw
        values.update(overrides)
        return cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_service(self, service: str) -> Settings:
        """These settings with the ``[services.<service>]`` table applied."""
        table = self.service_overrides.get(service)
        if not table:
            return self
        types = _field_types()
        known = {k: _coerce(k, v, types[k]) for k, v in table.items() if k in types}
        return dataclasses.replace(self, **known) if known else self

    def service_option(self, service: str, key: str, default: Any) -> Any:
        """A per-service option that is not a :class:`Settings` field (e.g. flap limits)."""
        return self.service_overrides.get(service, {}).get(key, default)

    @property
    def advertised_host(self) -> str:
        """The host name other machines use to reach this process."""
        if self.advertise_host:
            return self.advertise_host
        if self.bind_host in ("0.0.0.0", "::", "*", ""):
            import socket

            return socket.getfqdn()
        return self.bind_host


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(Settings)}


def _check_keys(table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [meshkit] must be a table")
    unknown = set(table) - set(_field_types()) - {"service_overrides"}
    if unknown:
        raise ConfigError(f"{source}: unknown settings {sorted(unknown)}")
    return dict(table)


def _coerce(name: str, value: Any, type_name: str) -> Any:
    if name == "service_overrides":
        return value
    try:
        if type_name == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name} expects {type_name}, got {value!r}") from None
