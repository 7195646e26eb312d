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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Settings
from ..errors import ConfigError
from .jsonrpc import MAX_BATCH


@dataclass(frozen=True)
class GatewayOptions:
    """Validated gateway options (see the module doc for meanings and defaults)."""

    listener: str = "stratum"
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

    def __post_init__(self) -> None:
        if not self.listener:
            raise ConfigError("gateway listener name must not be empty")
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
