"""The gateway's options: the ``[services.<name>]`` table, overridable from the environment.

Each option is read, lowest precedence first, from its default, the
``[services.gateway]`` table of the settings file and the environment variable
``MESHKIT_GATEWAY_<OPTION>`` (upper case; lists are comma-separated), as
:meth:`Settings.section <meshkit.config.Settings.section>` reads every section.
A subclass named ``ws`` reads ``[services.ws]`` and ``MESHKIT_WS_<OPTION>``.
Durations are seconds; 0 disables ``idle_timeout``.

=================  ==========  =====================================================
listener           stratum     listener name advertised in the registry record
                               (what HAProxy frontends route to)
dialect            jsonrpc     what the listener writes: ``jsonrpc`` (JSON-RPC 2.0)
                               or ``stratum`` (JSON-RPC 1.0 style: ``"error": null``
                               in every answer, errors as ``[code, message, data]``,
                               no ``"jsonrpc"`` member; :mod:`.dialect`)
topics             jobs.*      mesh topics (or ``prefix.*`` patterns) forwarded to
                               clients that subscribe to them
services           (empty)     services clients may call; empty means any service
                               seen in the registry since the gateway started
max_line           16384       longest request line in bytes, newline excluded
max_inflight       32          requests in flight per connection (batch items
                               included)
max_batch          64          items one batch may hold; a larger batch is refused
                               whole with ``batch_too_large``
max_connections    10000       client connections per gateway instance
max_output         1048576     bytes queued for a client before it is dropped as
                               a slow consumer (one larger answer on its own is
                               still sent; a batch's answer is cut to fit it)
max_subscriptions  64          topics and patterns one connection may subscribe to
idle_timeout       300         close a connection that sent nothing for this long
request_timeout    10          deadline of each mesh call made for a client
drain_grace        30          how long a stopping gateway keeps its clients: the
                               gateway's one drain grace (its ``Service.stop``
                               uses it, not ``Settings.drain_grace``)
close_timeout      5           how long a closing connection may take to deliver
                               what was written to it (acknowledged by the
                               client's TCP) before it is reset; it counts
                               against ``max_connections`` until its socket is gone
=================  ==========  =====================================================

The edge: client addresses, limits, bans, stopping, backends gone
(``docs/gateway.md``). Rates are per second; 0 turns a limit off.

==================  ==================  =============================================
proxy_protocol      accept              ``require``: every connection must begin with a
                                        PROXY v1/v2 header (else closed, counted);
                                        ``accept``: used when present; ``off``: never
                                        read (the socket's peer is the client)
proxy_timeout       5                   seconds to wait for a whole PROXY header (the
                                        bytes are bounded by the parser: 107 / 1040)
limit_exempt        127.0.0.0/8,::1     networks no limit or ban applies to
max_per_address     256                 open connections per client address
connect_rate        20                  new connections per second per address ...
connect_burst       40                  ... beyond a burst of this many
request_rate        100                 requests per second per connection (per address
                                        for HTTP requests) ...
request_burst       200                 ... beyond a burst of this many (the rest are
                                        answered ``rate_limited``, not run)
ban_time            600                 seconds the policy (or ``BanClientError``) bans an
                                        address; 0: the policy bans nobody (operators'
                                        bans still hold)
ban_ratio           0.5                 ban when at least this share of ...
ban_min_requests    500                 ... this many requests from the address was bad
ban_on              invalid,client      what is bad: ``invalid`` requests (refused by
                                        the gateway) and ``client`` faults (backend
                                        errors: ``ClientFaultError`` and those named in
                                        ``client_faults``)
client_faults       (empty)             more error codes (``RefusedError`` subclasses'
                                        ``code``), or class names of plain exceptions,
                                        that are the client's fault (``client_fault``
                                        always is; ``BanClientError`` always bans)
max_addresses       100000              client addresses tracked for rates and bans
ban_sync            30                  seconds between full reads of the bans in Redis
reconnect_method    mesh.reconnect      notification asking clients to move when the
                                        gateway stops (``client.reconnect`` for Stratum);
                                        empty: none
reconnect_address   (empty)             ``host:port`` clients are told to reconnect to
                                        (the public address); empty: where they were
reconnect_window    10                  seconds over which the notification goes out in
                                        waves (at most ``drain_grace`` less 1 s)
reconnect_rate      0                   at most this many clients told per second; 0:
                                        spread evenly over ``reconnect_window``
gone_after          0                   seconds a called service may have no instance
                                        before its clients are told; 0: never
gone_method         mesh.service_gone   that notification (params ``{"service"}``)
gone_disconnect     false               also close the clients that used it
==================  ==================  =============================================

HTTP and WebSocket (``docs/gateway.md``, :mod:`.web`); the limits above apply
to them too (a body or message is bounded by ``max_line``):

==================  ==========  ====================================================
web_listener        (empty)     listener name of the HTTP/WebSocket port advertised
                                in the registry (``web``); empty: no such listener
http_path           /rpc        where JSON-RPC requests are POSTed
ws_path             /ws         where WebSocket clients connect
health_path         /health     HAProxy's ``http-check`` (``200 pong``)
cors_origins        (empty)     origins browsers may call from (``*``: any); empty:
                                no CORS headers
ws_heartbeat        30          seconds between the gateway's pings; a pong must
                                come within half of it; 0: no pings
==================  ==========  ====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Settings
from ..errors import ConfigError
from . import dialect as dialect_names
from .jsonrpc import MAX_BATCH
from .limits import Exemptions

#: Values of ``proxy_protocol``.
PROXY_MODES = ("require", "accept", "off")
#: What ``ban_on`` may name.
BAN_ON = ("invalid", "client")


@dataclass(frozen=True)
class GatewayOptions:
    """Validated gateway options (see the module doc for meanings and defaults)."""

    listener: str = "stratum"
    dialect: str = dialect_names.JSONRPC
    topics: tuple[str, ...] = ("jobs.*",)
    services: tuple[str, ...] = ()
    max_line: int = 16384
    max_inflight: int = 32
    max_batch: int = MAX_BATCH
    max_connections: int = 10000
    max_output: int = 1024 * 1024
    max_subscriptions: int = 64
    idle_timeout: float = 300.0
    request_timeout: float = 10.0
    drain_grace: float = 30.0
    close_timeout: float = 5.0
    proxy_protocol: str = "accept"
    proxy_timeout: float = 5.0
    limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1")
    max_per_address: int = 256
    connect_rate: float = 20.0
    connect_burst: int = 40
    request_rate: float = 100.0
    request_burst: int = 200
    ban_time: float = 600.0
    ban_ratio: float = 0.5
    ban_min_requests: int = 500
    ban_on: tuple[str, ...] = ("invalid", "client")
    client_faults: tuple[str, ...] = ()
    max_addresses: int = 100000
    ban_sync: float = 30.0
    reconnect_method: str = "mesh.reconnect"
    reconnect_address: str = ""
    reconnect_window: float = 10.0
    reconnect_rate: float = 0.0
    gone_after: float = 0.0
    gone_method: str = "mesh.service_gone"
    gone_disconnect: bool = False
    web_listener: str = ""
    http_path: str = "/rpc"
    ws_path: str = "/ws"
    health_path: str = "/health"
    cors_origins: tuple[str, ...] = ()
    ws_heartbeat: float = 30.0

    def __post_init__(self) -> None:
        if not self.listener:
            raise ConfigError("gateway listener name must not be empty")
        if self.dialect not in dialect_names.NAMES:
            raise ConfigError(f"gateway dialect must be one of {list(dialect_names.NAMES)}, "
                              f"got {self.dialect!r}")
        if any(not t or t == "*" for t in self.topics):
            raise ConfigError(f"gateway topics must be non-empty topics or prefix.* patterns, "
                              f"got {list(self.topics)}")
        for name in ("max_line", "max_inflight", "max_batch", "max_connections", "max_output",
                     "max_subscriptions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gateway {name} must be at least 1")
        if (self.idle_timeout < 0 or self.request_timeout <= 0 or self.drain_grace < 0
                or self.close_timeout < 0):
            raise ConfigError("gateway idle_timeout, drain_grace and close_timeout must be >= 0, "
                              "request_timeout > 0")
        self._check_edge()

    def _check_edge(self) -> None:
        if self.proxy_protocol not in PROXY_MODES:
            raise ConfigError(f"gateway proxy_protocol must be one of {PROXY_MODES}, "
                              f"got {self.proxy_protocol!r}")
        for name in ("proxy_timeout", "connect_rate", "request_rate", "ban_time", "reconnect_window",
                     "reconnect_rate", "gone_after", "max_per_address", "connect_burst",
                     "request_burst", "ban_min_requests"):
            if getattr(self, name) < 0:
                raise ConfigError(f"gateway {name} must be >= 0")
        if self.proxy_timeout <= 0 or self.ban_sync <= 0 or self.max_addresses < 1:
            raise ConfigError("gateway proxy_timeout and ban_sync must be > 0, max_addresses >= 1")
        if not 0 < self.ban_ratio <= 1:
            raise ConfigError(f"gateway ban_ratio must be in (0, 1], got {self.ban_ratio}")
        unknown = set(self.ban_on) - set(BAN_ON)
        if unknown:
            raise ConfigError(f"gateway ban_on may hold {BAN_ON}, got {sorted(unknown)}")
        if self.reconnect_address:
            host, _, port = self.reconnect_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"gateway reconnect_address must be host:port, "
                                  f"got {self.reconnect_address!r}")
        Exemptions(self.limit_exempt)  # raises ConfigError for a bad network
        self._check_web()

    def _check_web(self) -> None:
        paths = (self.http_path, self.ws_path, self.health_path)
        if any(not p.startswith("/") or any(c in p for c in " ?#") for p in paths):
            raise ConfigError(f"gateway http_path, ws_path and health_path must be paths "
                              f"starting with /, got {list(paths)}")
        if len(set(paths)) != 3:
            raise ConfigError(f"gateway http_path, ws_path and health_path must differ, "
                              f"got {list(paths)}")
        if self.ws_heartbeat < 0:
            raise ConfigError("gateway ws_heartbeat must be >= 0")
        if self.web_listener and self.web_listener == self.listener:
            raise ConfigError(f"gateway web_listener must differ from listener "
                              f"({self.listener!r})")

    @classmethod
    def from_settings(cls, settings: Settings, service: str = "gateway",
                      env: Mapping[str, str] | None = None) -> GatewayOptions:
        """Options for ``service``: its settings table, then its ``MESHKIT_<SERVICE>_*`` variables.

        The variables are those :meth:`Settings.load` saw (``env``, when
        given, stands in for them); loading is :meth:`Settings.section`'s.
        """
        if env is not None:
            settings = settings.replace(environment=env)
        return settings.section(cls, service)
