"""The gateway: client TCP connections in front of the mesh (see ``docs/gateway.md``).

``meshkit run meshkit.gateway:Gateway`` runs one. Backends keep per-connection
state with :class:`ConnectionStore` / :class:`ConnectionState`. Importing this
package does nothing else.

The layers, lowest first (each imports only those before it):

* :mod:`~meshkit.gateway.jsonrpc` — the line protocol (its docstring is the spec): parsing, answers, codes
* :mod:`~meshkit.gateway.limits` — per-address limits and token buckets (pure)
* :mod:`~meshkit.gateway.dialect` — what a listener writes: JSON-RPC 2.0 or Stratum's 1.0 style
* :mod:`~meshkit.gateway.options` — ``GatewayOptions``, the limits
* :mod:`~meshkit.gateway.subscriptions` — what a client may subscribe to
* :mod:`~meshkit.gateway.builtin` — the ``mesh.*`` methods, ``mesh.ping`` for HAProxy's check
* :mod:`~meshkit.gateway.push` — pushing to one connection by id (``push_to_connection``), both sides
* :mod:`~meshkit.gateway.linger` — closing a socket: delivered within a bound, else reset
* :mod:`~meshkit.gateway.proxy_protocol` — PROXY v1/v2 headers (its docstring is the spec)
* :mod:`~meshkit.gateway.waves` — reconnect wave plans (pure)
* :mod:`~meshkit.gateway.bans` — the ban policy, the bans in memory and in Redis
* :mod:`~meshkit.gateway.admission` — what a new connection passes: its header, bans, limits
* :mod:`~meshkit.gateway.moving` — moving clients off a stopping gateway; backends gone
* :mod:`~meshkit.gateway.connection` — one client connection: reading, fairness, backpressure, closing
* :mod:`~meshkit.gateway.state` — per-connection state in Redis
* :mod:`~meshkit.gateway.keeper` — when a connection's state is created, restored and deleted
* :mod:`~meshkit.gateway.service` — the ``Gateway`` service: accepting, routing, pushes, sweeps
"""

from .options import GatewayOptions
from .push import gateway_of, push_to_connection
from .service import Gateway
from .state import (
    ConnectionGoneError,
    ConnectionState,
    ConnectionStore,
    NoConnectionError,
    pooled_redis,
)

__all__ = [
    "ConnectionGoneError",
    "ConnectionState",
    "ConnectionStore",
    "Gateway",
    "GatewayOptions",
    "NoConnectionError",
    "gateway_of",
    "pooled_redis",
    "push_to_connection",
]
