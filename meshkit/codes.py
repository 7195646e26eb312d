"""The protocol's vocabulary: every error code and every state, in one place.

Error codes are the stable strings that cross the wire in an ERROR body
(``docs/protocol.md`` §5); states are the strings of an instance's record and
PONG (:class:`InstanceState`), and the lifecycles of a service, a peer
connection and a gateway connection. Each is a :class:`StrEnum`, so a
member *is* its string: it compares equal to it, hashes like it, and
MessagePack and JSON encode it as that string. Code that receives a value
from a peer compares it with the members; it never needs to build one.

Error codes
-----------
=====================  ============================================================
unknown_service        the instance is not the service named in ``target``
unknown_method         no such method, or no handler for the topic
bad_arguments          the arguments do not fit the method's signature
bad_request            malformed message: wrong frame count, header or body not
                       MessagePack, wrong item types
unsupported_version    header version not spoken; the ERROR carries ``"supported"``
handler_error          the handler raised; ``type`` and ``message`` describe it
refused                the handler refused on purpose (``RefusedError``); a message
                       starting ``"[N] "`` carries a client-facing code ``N``
unknown_connection     (a gateway's ``gateway.deliver`` PUSH) no such open connection
deadline_exceeded      the deadline passed before the work started; not run
draining               the instance is shutting down and did not start the work;
                       the caller should send it to another instance
reply_too_large        the result exceeded the server's maximum message size
overloaded             past a receiver limit (calls in flight, pushes queued, bytes
                       held, or a method's or service's concurrency limit and its
                       queue full); not run (a publisher counts it undelivered)
resource_exhausted     a named resource the method uses is at its cluster-wide limit
                       and the method does not wait for it; not run
=====================  ============================================================

New codes may be added, so a receiver treats an unknown code as a generic
remote error. A service adds its own with
:func:`meshkit.errors.register_error_code` (the gateway's
``connection_gone``), so its errors travel as codes, never as class names.
:class:`LocalCode` names the codes of failures the caller reports itself,
which never cross the wire.
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A string enum whose members format and print as their value (``enum.StrEnum`` of 3.11, on 3.10 too)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ErrorCode(StrEnum):
    """The error codes a meshkit receiver sends (``docs/protocol.md`` §5)."""

    UNKNOWN_SERVICE = "unknown_service"
    UNKNOWN_METHOD = "unknown_method"
    BAD_ARGUMENTS = "bad_arguments"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDLER_ERROR = "handler_error"
    REFUSED = "refused"
    UNKNOWN_CONNECTION = "unknown_connection"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    DRAINING = "draining"
    REPLY_TOO_LARGE = "reply_too_large"
    OVERLOADED = "overloaded"
    RESOURCE_EXHAUSTED = "resource_exhausted"


class LocalCode(StrEnum):
    """Codes of failures the calling side reports itself (never sent; used in metrics and logs)."""

    CALL_ERROR = "call_error"
    NO_INSTANCE = "no_instance"
    TIMEOUT = "timeout"
    LOST_PEER = "lost_peer"
    TOO_LARGE = "too_large"
    REMOTE_ERROR = "remote_error"  # an error whose code this side does not know
    REGISTRY_UNREACHABLE = "registry_unreachable"
    CANCELLED = "cancelled"


class InstanceState(StrEnum):
    """An instance's state as its record and its PONG carry it."""

    UP = "up"
    DRAINING = "draining"


class ServiceState(StrEnum):
    """Where a :class:`~meshkit.Service` is in its life (``Service.state``)."""

    NEW = "new"
    UP = "up"
    STOPPING = "stopping"
    STOPPED = "stopped"


class PeerState(StrEnum):
    """A client's connection to one instance (``Peer.state``)."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"
