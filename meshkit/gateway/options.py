"""The gateway's options: the ``[services.<name>]`` table, overridable from the environment.

Each option is read, lowest precedence first, from its default, the
``[services.gateway]`` table of the settings file (``Settings.service_option``)
and the environment variable ``MESHKIT_GATEWAY_<OPTION>`` (upper case; lists
are comma-separated). A subclass named ``ws`` reads ``[services.ws]`` and
``MESHKIT_WS_<OPTION>``. Durations are seconds; 0 disables ``idle_timeout``.

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
drain_grace        30          how long a stopping gateway keeps its clients
close_timeout      5           how long a closing connection may take to deliver
                               what was written to it (acknowledged by the
                               client's TCP) before it is reset; it counts
                               against ``max_connections`` until its socket is gone
=================  ==========  =====================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..config import Settings
from ..errors import ConfigError
from . import dialect as dialect_names
from .jsonrpc import MAX_BATCH


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

    @classmethod
    def from_settings(cls, settings: Settings, service: str = "gateway",
                      env: Mapping[str, str] | None = None) -> GatewayOptions:
        """Options for ``service`` from its settings table and ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        prefix = f"MESHKIT_{service.upper().replace('-', '_')}_"
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(prefix + f.name.upper())
            value = raw if raw is not None else settings.service_option(service, f.name, None)
            if value is not None:
                values[f.name] = _coerce(f.name, value, getattr(cls, f.name))
        return cls(**values)


def _coerce(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"gateway option {name} expects {type(default).__name__}, "
                          f"got {value!r}") from None
