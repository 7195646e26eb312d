"""The gateway: client TCP connections in front of the mesh (see ``docs/gateway.md``).

``meshkit run meshkit.gateway:Gateway`` runs one. Backends keep per-connection
state with :class:`ConnectionStore` / :class:`ConnectionState`. Importing this
package does nothing else.
"""

from .options import GatewayOptions
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
    "pooled_redis",
]
