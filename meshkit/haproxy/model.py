"""What HAProxy should look like: frontends, backends and servers, from config plus registry.

:func:`build_model` is pure: the same :class:`ProxyConfig` and records give
the same :class:`Model`, so it is tested without HAProxy or Redis. A record
becomes a server of a backend when its ``service`` and one of its
``listeners`` match a frontend's; the listener's ``host:port`` is where
HAProxy connects.

The *structure* of a model (frontends, backends and every setting, but no
servers) decides whether HAProxy must be reloaded; servers alone are changed
at run time.

Every name and address that goes into an HAProxy runtime command (where
``;`` separates commands) or into the configuration file passes through one
function, :func:`haproxy_token`, when the :class:`Server`, :class:`Backend`
or :class:`Frontend` holding it is built: a model cannot hold an unsafe one.
Records whose listener breaks the registry grammar (:mod:`meshkit.names`)
become problems, never servers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .. import names
from ..record import InstanceRecord
from ..untrusted import clip
from .config import ProxyConfig

Resolver = Callable[[str], str]
"""Turns a host name into the IP address HAProxy should use (raises ``OSError``).

Called while the model is built, so it should answer from memory: the sync
process resolves names beforehand (:mod:`meshkit.haproxy.hosts`), for the
hosts :func:`listener_hosts` lists.
"""

_NOT_IDENT = re.compile(r"[^A-Za-z0-9_.:-]")
MAX_NAME = 48
# One word of an HAProxy command or configuration line: no space (word
# separator), ";" (command separator), "#" (comment), quote, backslash or
# line break. "%" and brackets for IPv6 literals with a scope id.
_TOKEN = re.compile(r"[A-Za-z0-9_.:%\[\]-]{1,300}")


def haproxy_token(value: object) -> str:
    """``value`` if it is safe as one word of an HAProxy runtime command or configuration line.

    The one gate for names and addresses built from the registry: raises
    ``ValueError`` (value clipped) for anything but 1-300 characters of
    ``[A-Za-z0-9_.:%[]-]``.
    """
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise ValueError(f"not safe in an HAProxy command: {clip(value)!r}")
    return value


@dataclass(frozen=True, order=True)
class Server:
    """One gateway instance as a server of a backend.

    ``host`` is an IP address once a resolver ran (HAProxy reports addresses,
    and comparing them with names would never match).
    """

    name: str
    host: str
    port: int
    draining: bool = False
    instance: str = ""  # the record's key, for log messages

    def __post_init__(self) -> None:
        haproxy_token(self.name)
        haproxy_token(self.host)
        names.validate_port(self.port)

    @property
    def address(self) -> str:
        """``host:port`` as HAProxy spells it (IPv6 in brackets), checked by :func:`haproxy_token`."""
        return haproxy_token(f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")


@dataclass(frozen=True)
class Backend:
    """The servers behind one ``(service, listener)`` pair."""

    name: str
    mode: str
    service: str
    listener: str
    balance: str
    http_check: str = ""
    servers: tuple[Server, ...] = ()

    def __post_init__(self) -> None:
        haproxy_token(self.name)

    def server(self, name: str) -> Server | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None


@dataclass(frozen=True)
class Frontend:
    name: str
    bind: str
    mode: str
    backend: str
    maxconn: int = 0

    def __post_init__(self) -> None:
        haproxy_token(self.name)
        haproxy_token(self.backend)


@dataclass(frozen=True)
class Model:
    """The desired HAProxy: rendered into a configuration, or applied at run time."""

    config: ProxyConfig
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]
    problems: tuple[str, ...] = ()  # records that could not become servers, and why

    @property
    def server_options(self) -> str:
        """Options given to every server, in the config file and on ``add server``."""
        return self.config.server_options

    def backend(self, name: str) -> Backend | None:
        for backend in self.backends:
            if backend.name == name:
                return backend
        return None

    def without_servers(self) -> Model:
        """The structure alone: what must not change without a reload."""
        return replace(self, backends=tuple(replace(b, servers=()) for b in self.backends), problems=())


def backend_name(service: str, listener: str) -> str:
    """The backend of a ``(service, listener)`` pair: ``<service>.<listener>``, as an identifier."""
    return identifier(f"{service}.{listener}")


def server_name(instance_id: str) -> str:
    """A stable, valid HAProxy server name for an instance id.

    Ids that are already identifiers of at most :data:`MAX_NAME` characters
    are used as they are (meshkit's are 12 hex digits); others are cleaned
    and suffixed with a hash of the original, so two ids never collide.
    """
    return identifier(instance_id)


def identifier(text: str) -> str:
    """``text`` made a valid HAProxy identifier (letters, digits, ``_.:-``), stable and unique."""
    clean = _NOT_IDENT.sub("_", text)
    if clean == text and 0 < len(text) <= MAX_NAME:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{clean[: MAX_NAME - 9]}-{digest}"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts; raise ``ValueError`` outside the registry grammar."""
    return names.split_address(address)


def build_model(
    config: ProxyConfig,
    records: Iterable[InstanceRecord],
    resolve: Resolver | None = None,
) -> Model:
    """The model for ``config`` with the servers that ``records`` describe.

    Draining instances stay servers (marked ``draining``: no new connections,
    existing ones kept). Records whose listener address is malformed or does
    not resolve are left out and described in :attr:`Model.problems`.
    """
    backends: dict[str, Backend] = {}
    frontends = []
    for spec in config.frontends:
        name = backend_name(spec.service, spec.listener)
        backends.setdefault(
            name,
            Backend(name=name, mode=spec.mode, service=spec.service, listener=spec.listener,
                    balance=spec.balance, http_check=spec.http_check),
        )
        frontends.append(Frontend(name=spec.name, bind=spec.bind, mode=spec.mode, backend=name, maxconn=spec.maxconn))

    problems: list[str] = []
    servers: dict[str, dict[str, Server]] = {name: {} for name in backends}
    for record in sorted(records, key=lambda r: r.key):
        for backend in backends.values():
            if record.service != backend.service or backend.listener not in record.listeners:
                continue
            address = record.listeners[backend.listener]
            try:
                host, port = split_address(address)
                if resolve is not None:
                    host = resolve(host)
                server = Server(server_name(record.instance_id), host, port, not record.is_up, record.key)
            except (ValueError, OSError) as exc:
                problems.append(f"{clip(record.key)}: listener {backend.listener!r} at {clip(address)!r}: {exc}")
                continue
            servers[backend.name].setdefault(server.name, server)

    return Model(
        config=config,
        frontends=tuple(frontends),
        backends=tuple(replace(b, servers=tuple(sorted(servers[b.name].values()))) for b in backends.values()),
        problems=tuple(problems),
    )


def listener_hosts(config: ProxyConfig, records: Iterable[InstanceRecord]) -> set[str]:
    """The hosts (names and IP addresses alike) of every listener address :func:`build_model` routes to."""
    return {server.host for backend in build_model(config, records).backends for server in backend.servers}
