"""meshkit: a brokerless ZeroMQ service mesh.

The public surface is :data:`__all__` (pinned by ``tests/unit/test_public_api.py``);
everything else is internal. The test kit is :mod:`meshkit.testing`.

The layers, lowest first; a module imports only its own layer and those
below it, and there is no import circle (``docs/architecture.md`` draws who
imports whom; ``tests/unit/test_layout.py`` pins it):

1. foundation — ``errors config sections names topics keys programs untrusted
   tasks timing clock trace context decoder transport``
2. vocabulary — ``wire record handlers invoke budget metrics logs``
3. registry — ``registry registration storage rundir``
4. calls — ``client blocking pool peer publish server inbox``
5. service — ``service runner``
6. roles — ``gateway haproxy stack testing``
7. commands — ``cli``, ``__main__`` and this package's face
"""

from .blocking import Client
from .client import AsyncClient
from .config import Settings
from .context import CallContext, current_call
from .errors import (
    BadArgumentsError,
    BadRequestError,
    CallError,
    CallTimeoutError,
    ClientClosedError,
    ConfigError,
    HandlerError,
    LostPeerError,
    MeshError,
    MessageTooLargeError,
    NoInstanceError,
    ProtocolError,
    RefusedError,
    RegistryUnreachableError,
    RemoteError,
    ResourceExhaustedError,
    UnknownConnectionError,
    UnknownMethodError,
    UnknownServiceError,
    UnsupportedVersionError,
)
from .handlers import periodic, rpc, subscribe
from .record import InstanceRecord
from .service import Service

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadArgumentsError",
    "BadRequestError",
    "CallContext",
    "CallError",
    "CallTimeoutError",
    "Client",
    "ClientClosedError",
    "ConfigError",
    "HandlerError",
    "InstanceRecord",
    "LostPeerError",
    "MeshError",
    "MessageTooLargeError",
    "NoInstanceError",
    "ProtocolError",
    "RefusedError",
    "RegistryUnreachableError",
    "RemoteError",
    "ResourceExhaustedError",
    "Service",
    "Settings",
    "UnknownConnectionError",
    "UnknownMethodError",
    "UnknownServiceError",
    "UnsupportedVersionError",
    "__version__",
    "current_call",
    "periodic",
    "rpc",
    "subscribe",
]
