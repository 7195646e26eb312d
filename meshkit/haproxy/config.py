"""The HAProxy configuration file (``configs/haproxy.toml``): public listeners and tunables.

Format (every key but ``[[frontend]]`` is optional; defaults shown)::

    [haproxy]
    templates = "../haproxy"        # Jinja2 templates, relative to this file
    hard_stop_after = "1h"          # old workers keep client connections this long after a reload
    maxconn = 0                     # global connection limit; 0: derived from ulimit -n
    stop_timeout = 10.0             # seconds stopping an owned HAProxy may take in all: a soft stop,
                                    # then a hard stop in the last 2 s (the sync exits within ~2 s more)
    reconcile_interval = 1.0        # seconds between full comparisons with HAProxy's servers
    log = ""                        # a "log" target for connection logs, e.g. "stderr format short daemon info";
                                    # empty: none (HAProxy's own warnings still go to its stderr)
    send_proxy = "v2"               # PROXY header in front of every server connection and health check,
                                    # so gateways see each client's real address: "v2", "v1" or "none"

    [haproxy.timeouts]              # HAProxy time strings ("500ms", "2s", "1h")
    connect = "2s"
    client = "1h"                   # long-lived Stratum-style connections
    server = "1h"
    tunnel = "1h"
    client_fin = "30s"
    server_fin = "30s"
    queue = "5s"
    check = "300ms"                 # a check unanswered this long fails (a gateway answers in ~1 ms)
    http_request = "10s"
    http_keep_alive = "10s"

    [haproxy.check]                 # health checks of every server, static or added at run time
    inter = "500ms"
    fastinter = ""                  # between checks while a server changes state; empty: inter
                                    # (the shipped config says "100ms": a hung gateway is out in ~1 s)
    fall = 2
    rise = 1
    tcp_check = "jsonrpc"           # tcp backends: "jsonrpc" (the gateway answers mesh.ping from its
                                    # event loop) or "connect" (TCP connect only; a stopped process passes)

    [haproxy.retries]
    count = 2                       # connection retries (tcp and http)
    http_retry_on = "conn-failure empty-response response-timeout 503"

    [[frontend]]                    # one per public listener
    name = "stratum"                # HAProxy identifier
    bind = "*:3333"                 # host:port, or fd@N for an inherited listening socket
    mode = "tcp"                    # "tcp" or "http"
    service = "gateway"             # instances of this service ...
    listener = "stratum"            # ... that advertise this listener in their record
    balance = "leastconn"           # or roundrobin, first, random
    maxconn = 10000                 # optional
    http_check = "GET /health"      # optional, http only: else a TCP connect check

Frontends naming the same ``service`` and ``listener`` share one backend.
Nothing here is read at import time; :func:`load_proxy_config` reads a file.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError
from ..sections import read_section

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

T = TypeVar("T")

DEFAULT_CONFIG = "configs/haproxy.toml"
MODES = ("tcp", "http")
# Algorithms that HAProxy 2.6 accepts in a backend whose servers are added at
# run time (``add server`` refuses static ones, like map-based ``source``).
BALANCES = ("leastconn", "roundrobin", "first", "random")
_IDENT = re.compile(r"^[A-Za-z0-9_.:-]+$")
_DURATION = re.compile(r"^\d+(us|ms|s|m|h|d)?$")
_BIND = re.compile(r"^(fd@\d+|(ipv4@|ipv6@)?(\*|[A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]):\d{1,5})$")


@dataclass(frozen=True)
class FrontendSpec:
    """One public listener as declared in the file."""

    name: str
    bind: str
    service: str
    listener: str
    mode: str = "tcp"
    balance: str = "leastconn"
    maxconn: int = 0  # 0: HAProxy's default
    http_check: str = ""  # "METHOD /path" for an HTTP health check; empty: TCP connect

    @property
    def inherited_fd(self) -> int | None:
        """The file descriptor number when ``bind`` is ``fd@N``, else None."""
        return int(self.bind[3:]) if self.bind.startswith("fd@") else None


@dataclass(frozen=True)
class Timeouts:
    connect: str = "2s"
    client: str = "1h"
    server: str = "1h"
    tunnel: str = "1h"
    client_fin: str = "30s"
    server_fin: str = "30s"
    queue: str = "5s"
    check: str = "300ms"
    http_request: str = "10s"
    http_keep_alive: str = "10s"


TCP_CHECKS = ("jsonrpc", "connect")
SEND_PROXY = ("v2", "v1", "none")
# What each send_proxy value adds to a server line: the header on client
# connections, and on health checks too (a gateway that requires the
# header would close a check without one).
_PROXY_OPTIONS = {"v2": "send-proxy-v2 check-send-proxy", "v1": "send-proxy check-send-proxy", "none": ""}


@dataclass(frozen=True)
class HealthCheck:
    inter: str = "500ms"
    fall: int = 2
    rise: int = 1
    fastinter: str = ""  # empty: HAProxy uses inter
    tcp_check: str = "jsonrpc"  # how tcp backends are checked: one of TCP_CHECKS

    @property
    def server_options(self) -> str:
        """Options for a ``server`` line and for ``add server`` alike.

        They are spelled out on every server: ``default-server`` does not
        apply to servers added at run time. (What a check sends is the
        backend's ``tcp-check`` rules, which servers added at run time use too.)
        """
        fast = f" fastinter {self.fastinter}" if self.fastinter else ""
        return f"check inter {self.inter}{fast} fall {self.fall} rise {self.rise}"


@dataclass(frozen=True)
class Retries:
    count: int = 2
    http_retry_on: str = "conn-failure empty-response response-timeout 503"


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``configs/haproxy.toml`` declares (see the module doc for the format)."""

    frontends: tuple[FrontendSpec, ...]
    templates: Path
    hard_stop_after: str = "1h"
    maxconn: int = 0  # 0: HAProxy derives it from the file-descriptor limit
    stop_timeout: float = 10.0  # the whole stop of an owned HAProxy, soft then hard
    reconcile_interval: float = 1.0
    log: str = ""  # HAProxy "log" target for connection logs; empty: none
    send_proxy: str = "v2"  # one of SEND_PROXY
    timeouts: Timeouts = field(default_factory=Timeouts)
    check: HealthCheck = field(default_factory=HealthCheck)
    retries: Retries = field(default_factory=Retries)

    @property
    def server_options(self) -> str:
        """Options for every ``server`` line and ``add server``: health checks, then the PROXY header."""
        extra = _PROXY_OPTIONS[self.send_proxy]
        return f"{self.check.server_options} {extra}" if extra else self.check.server_options

    def with_binds(self, binds: Mapping[str, str]) -> ProxyConfig:
        """A copy with some frontends bound elsewhere (``{"stratum": "fd@5"}``)."""
        known = {f.name for f in self.frontends}
        unknown = sorted(set(binds) - known)
        if unknown:
            raise ConfigError(f"--bind names unknown frontends {unknown}; known: {sorted(known)}")
        for name, bind in binds.items():
            _check_bind(name, bind)
        frontends = tuple(replace(f, bind=binds.get(f.name, f.bind)) for f in self.frontends)
        return replace(self, frontends=frontends)

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        """File descriptors the frontends bind with ``fd@N`` (HAProxy must inherit them)."""
        return tuple(sorted({fd for f in self.frontends if (fd := f.inherited_fd) is not None}))


# ProxyConfig fields that are not plain values of the [haproxy] table.
_NOT_SCALARS = frozenset({"frontends", "templates", "timeouts", "check", "retries"})
_TOP_KEYS = frozenset(f.name for f in dataclasses.fields(ProxyConfig)) - {"frontends"}


def default_templates() -> Path:
    """The ``haproxy/`` directory of the meshkit checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "haproxy"


def load_proxy_config(path: str | Path = DEFAULT_CONFIG) -> ProxyConfig:
    """Read and validate a ``haproxy.toml``; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read HAProxy config {path}: {exc}") from None
    return parse_proxy_config(data, base=path.parent, source=str(path))


def parse_proxy_config(data: Mapping[str, Any], base: Path, source: str = "<haproxy config>") -> ProxyConfig:
    """Build a :class:`ProxyConfig` from parsed TOML; relative paths are taken from ``base``."""
    unknown = set(data) - {"haproxy", "frontend"}
    if unknown:
        raise ConfigError(f"{source}: unknown tables {sorted(unknown)}")
    top = _table(data.get("haproxy", {}), f"{source} [haproxy]")
    unknown = set(top) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown keys in [haproxy]: {sorted(unknown)}")
    timeouts = _section(Timeouts, top.get("timeouts", {}), f"{source} [haproxy.timeouts]")
    for name, value in vars(timeouts).items():
        _check_duration(f"{source}: timeouts.{name}", value)
    check = _section(HealthCheck, top.get("check", {}), f"{source} [haproxy.check]")
    _check_duration(f"{source}: check.inter", check.inter)
    if check.fastinter:
        _check_duration(f"{source}: check.fastinter", check.fastinter)
    if check.tcp_check not in TCP_CHECKS:
        raise ConfigError(f"{source}: check.tcp_check must be one of {TCP_CHECKS}, "
                          f"got {check.tcp_check!r}")
    retries = _section(Retries, top.get("retries", {}), f"{source} [haproxy.retries]")
    frontends = _frontends(data.get("frontend", []), source)
    scalars = read_section(ProxyConfig, top, f"{source} [haproxy]", ignore_unknown=True, skip=_NOT_SCALARS)
    _check_counts(f"{source} [haproxy]", scalars)
    templates = Path(str(top["templates"])) if "templates" in top else default_templates()
    config = ProxyConfig(
        frontends=frontends,
        templates=templates if templates.is_absolute() else (base / templates).resolve(),
        timeouts=timeouts,
        check=check,
        retries=retries,
        **scalars,
    )
    if not (config.templates / "haproxy.cfg.j2").is_file():
        raise ConfigError(f"{source}: no haproxy.cfg.j2 in the templates directory {config.templates}")
    _check_duration(f"{source}: hard_stop_after", config.hard_stop_after)
    if config.send_proxy not in SEND_PROXY:
        raise ConfigError(f"{source}: send_proxy must be one of {SEND_PROXY}, got {config.send_proxy!r}")
    if config.reconcile_interval <= 0 or config.stop_timeout < 0:
        raise ConfigError(f"{source}: reconcile_interval must be > 0 and stop_timeout >= 0")
    return config


def _frontends(raw_frontends: Any, source: str) -> tuple[FrontendSpec, ...]:
    if not isinstance(raw_frontends, list) or not raw_frontends:
        raise ConfigError(f"{source}: declare at least one [[frontend]]")
    frontends = tuple(_frontend(raw, f"{source} [[frontend]] #{i + 1}") for i, raw in enumerate(raw_frontends))
    names = [f.name for f in frontends]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: frontend names must be unique, got {names}")
    modes: dict[tuple[str, str], str] = {}
    for f in frontends:
        if modes.setdefault((f.service, f.listener), f.mode) != f.mode:
            raise ConfigError(f"{source}: frontends of {f.service}/{f.listener} disagree on mode")
    return frontends


def _frontend(raw: Any, where: str) -> FrontendSpec:
    values = read_section(FrontendSpec, _table(raw, where), where)
    _check_counts(where, values)
    for key in ("name", "bind", "service", "listener"):
        if not values.get(key):
            raise ConfigError(f"{where}: {key!r} is required")
    spec = FrontendSpec(**values)
    if not _IDENT.match(spec.name):
        raise ConfigError(f"{where}: name {spec.name!r} is not a valid HAProxy identifier")
    if spec.mode not in MODES:
        raise ConfigError(f"{where}: mode must be one of {MODES}, got {spec.mode!r}")
    if spec.balance not in BALANCES:
        raise ConfigError(f"{where}: balance must be one of {BALANCES}, got {spec.balance!r}")
    if spec.http_check and spec.mode != "http":
        raise ConfigError(f"{where}: http_check needs mode = \"http\"")
    if spec.http_check and not re.match(r"^[A-Z]+ /\S*$", spec.http_check):
        raise ConfigError(f"{where}: http_check must look like \"GET /health\", got {spec.http_check!r}")
    _check_bind(spec.name, spec.bind)
    return spec


def _check_bind(name: str, bind: str) -> None:
    if not _BIND.match(bind):
        raise ConfigError(f"frontend {name}: bind must be host:port or fd@N, got {bind!r}")


def _check_duration(where: str, value: str) -> None:
    if not _DURATION.match(value):
        raise ConfigError(f"{where}: {value!r} is not an HAProxy duration (like 500ms, 2s, 1h)")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return value


def _section(cls: type[T], table: Any, where: str) -> T:
    """One of the ``[haproxy.*]`` sections, by the common loader; its counts are never negative."""
    values = read_section(cls, table, where)
    _check_counts(where, values)
    return cls(**values)


def _check_counts(where: str, values: Mapping[str, Any]) -> None:
    """Every integer of a HAProxy section (``maxconn``, ``fall``, ``rise``, ``count``) is a count."""
    for key, value in values.items():
        if type(value) is int and value < 0:
            raise ConfigError(f"{where}: {key} must be a non-negative integer, got {value}")
