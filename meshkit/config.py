"""Settings: one typed object built from defaults, a TOML file and ``MESHKIT_*`` variables.

Precedence, lowest first: the defaults below; the ``[meshkit]`` table of the
file named by ``MESHKIT_CONFIG`` (or the path given to :meth:`Settings.load`);
``MESHKIT_<FIELD>`` environment variables (for example ``MESHKIT_REDIS_URL``,
``MESHKIT_NAMESPACE``, ``MESHKIT_CALL_TIMEOUT``); keyword overrides. Nothing
is read at import time; a :class:`Settings` is passed to whatever needs it.

Per-service tables ``[services.<name>]`` in the same file hold settings that
differ by service (``log_level``, ``flap_max_restarts``, ...); read them with
:meth:`Settings.for_service`. Other sections of a service (the gateway's
options, flap limits) come from the same table through :meth:`Settings.section`,
with ``MESHKIT_<SERVICE>_<KEY>`` variables over it; every section is read
by the one loader in :mod:`meshkit.sections`, and the environment is read
only by :meth:`Settings.load`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from .errors import ConfigError
from .sections import load_section, read_section
from .untrusted import clip

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

T = TypeVar("T")

ENV_PREFIX = "MESHKIT_"
# Fields that hold tables, not values: never read from a variable or coerced.
TABLE_FIELDS = frozenset({"service_overrides", "environment", "resources"})
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # Redis's own default; `meshkit up` starts a private one instead


@dataclass(frozen=True)
class ResourceLimit:
    """One ``[resources.<name>]`` table: a cluster-wide limit on a named resource (docs/limits.md).

    ``rate`` units per second and/or ``concurrency`` units in use at once, over
    every instance (0: that limit is off). Instances lease units in batches of
    ``lease_fraction`` of the limit; rate windows are ``window`` seconds long;
    a concurrency lease lapses ``lease_ttl`` seconds after its last renewal.
    """

    rate: float = 0.0
    concurrency: int = 0
    window: float = 0.1
    lease_fraction: float = 0.1
    lease_ttl: float = 3.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.rate) or self.rate < 0 or self.concurrency < 0:
            raise ConfigError("resource rate and concurrency must be non-negative")
        if not self.rate and not self.concurrency:
            raise ConfigError("a resource needs a rate, a concurrency or both")
        if not 0.01 <= self.window <= 60 or not 0 < self.lease_fraction <= 1 or not 0.3 <= self.lease_ttl <= 600:
            raise ConfigError("resource window must be 0.01-60 s, lease_fraction in (0, 1], lease_ttl 0.3-600 s")


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
    # -- call limits (docs/limits.md) ---------------------------------------------------------
    max_concurrency: int = 0  # calls of this service running at once on one instance; 0: no limit
    max_queued_calls: int = 1000  # calls waiting for a slot of a limited method or service; past it: overloaded
    max_queued_call_bytes: int = 16 * 1024 * 1024  # bytes those waiting calls hold
    # [resources.<name>] tables: cluster-wide limits of named resources (ResourceLimit's fields).
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The MESHKIT_* variables load() saw; sections read theirs here, never from os.environ.
    environment: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

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
        self.resource_limits()  # raises ConfigError for a bad [resources.<name>] table

    def resource_limits(self) -> dict[str, ResourceLimit]:
        """The ``[resources.<name>]`` tables, typed and checked (:class:`ConfigError` if one is bad)."""
        if not isinstance(self.resources, Mapping):
            raise ConfigError("[resources] must be a table of tables")
        found = {}
        for name, table in self.resources.items():
            if not isinstance(name, str) or not name or len(name) > 100 or not name.replace("_", "a").isalnum():
                raise ConfigError(f"resource names are 1-100 letters, digits and _, got {clip(name)!r}")
            found[name] = load_section(ResourceLimit, table, f"[resources.{name}]")
        return found

    def _check_limits(self) -> None:
        minimums = {"max_header_size": 1024, "max_name_length": 1, "max_calls_per_peer": 1,
                    "max_call_bytes_per_peer": 1, "max_queued_pushes": 1, "max_queued_push_bytes": 1,
                    "max_inflight": 1, "max_inflight_bytes": 1,
                    "max_body_containers": 1024, "topic_cache_bytes": 0, "max_log_line": 1024,
                    "max_concurrency": 0, "max_queued_calls": 0, "max_queued_call_bytes": 0}
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
        """Build settings from file, environment and ``overrides`` (see module doc).

        This is the one place meshkit reads the environment (``os.environ``
        unless ``env`` is given). The ``MESHKIT_*`` variables it saw are kept
        in :attr:`environment`, where other sections (:meth:`section`) find
        their own variables.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        file = path or env.get(ENV_PREFIX + "CONFIG")
        if file:
            try:
                data = tomllib.loads(Path(file).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {file}: {exc}") from None
            values.update(read_section(cls, data.get("meshkit", {}), f"{file} [meshkit]",
                                       skip=TABLE_FIELDS, unknown_noun="settings"))
            services = data.get("services", {})
            if not isinstance(services, dict):
                raise ConfigError(f"{file}: [services] must be a table of tables")
            values["service_overrides"] = services
            values["resources"] = data.get("resources", {})
        values.update(read_section(cls, {}, "environment", env=env, env_prefix=ENV_PREFIX, skip=TABLE_FIELDS))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        tables = {k: v for k, v in overrides.items() if k in TABLE_FIELDS}
        values.update(read_section(cls, {k: v for k, v in overrides.items() if k not in TABLE_FIELDS},
                                   "setting", skip=TABLE_FIELDS))
        values.update(tables)
        values.setdefault("environment", {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_service(self, service: str) -> Settings:
        """These settings with the ``[services.<service>]`` table applied (keys that are no setting are left)."""
        table = self.service_overrides.get(service)
        if not table:
            return self
        known = read_section(Settings, table, f"[services.{service}]", ignore_unknown=True, skip=TABLE_FIELDS)
        return dataclasses.replace(self, **known) if known else self

    def section(self, cls: type[T], service: str) -> T:
        """Section ``cls`` of ``service``, read by :func:`meshkit.sections.read_section`.

        Lowest precedence first: the dataclass's defaults, the
        ``[services.<service>]`` table (keys that are no field of ``cls`` are
        left for other sections), and the variables
        ``MESHKIT_<SERVICE>_<FIELD>`` among those :meth:`load` saw (a ``-`` in
        the service name is ``_``).
        """
        prefix = f"{ENV_PREFIX}{service.upper().replace('-', '_')}_"
        return load_section(cls, self.service_overrides.get(service, {}), f"[services.{service}]",
                            env=self.environment, env_prefix=prefix, ignore_unknown=True)

    def service_option(self, service: str, key: str, default: Any) -> Any:
        """A per-service value that is not a :class:`Settings` field, untyped.

        Prefer a section (:meth:`section`), which is typed, validated and
        overridable from the environment.
        """
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
