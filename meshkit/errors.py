"""Every exception meshkit raises, rooted at :class:`MeshError`.

The tree says whose fault a failure is::

    MeshError
    ├── ConfigError              your settings are wrong (raised before anything runs)
    ├── ClientClosedError        you used a client or service after closing it
    ├── RegistryUnreachableError the registry's Redis did not answer (not: "no instances")
    ├── ProtocolError            bytes that are not valid meshkit frames (local decode)
    └── CallError                a call or publish did not produce a result
        ├── NoInstanceError      no live instance of the service is known  [no_instance]
        ├── CallTimeoutError     the deadline passed before a reply      [timeout]
        ├── LostPeerError        the instance died with the call in flight [lost_peer]
        ├── MessageTooLargeError the request exceeded the size limit      [too_large]
        └── RemoteError          the instance answered with an error
            ├── UnknownServiceError   the instance is not that service  [unknown_service]
            ├── UnknownMethodError    no such @rpc method               [unknown_method]
            ├── BadArgumentsError     arguments do not fit the method   [bad_arguments]
            ├── BadRequestError       the instance could not decode it  [bad_request]
            ├── UnsupportedVersionError  protocol version not spoken    [unsupported_version]
            ├── HandlerError          the handler raised                [handler_error]
            └── RefusedError          the handler refused on purpose     [refused]
                └── UnknownConnectionError  no open gateway connection has that id [unknown_connection]

Errors cross the wire as the stable string codes in brackets (see
:mod:`meshkit.wire`), never as pickles or import paths. ``draining`` and
``deadline_exceeded`` are codes the client consumes itself: the first makes it
retry on another instance, the second becomes :class:`CallTimeoutError`.
"""

from __future__ import annotations

import re
from typing import Any


class MeshError(Exception):
    """Root of every meshkit exception."""


class ConfigError(MeshError):
    """A setting is missing or malformed."""


class ClientClosedError(MeshError):
    """The client or service was closed by its owner and cannot be used."""


class RegistryUnreachableError(MeshError):
    """Redis could not be read: unreachable, refused the password, or timed out.

    Raised by :func:`meshkit.registry.load_records`, so a tool can tell "the
    registry is down" apart from "the registry is empty". The message names
    the Redis URL with its password masked, and the cause.
    """

    code = "registry_unreachable"

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"registry unreachable at {url}: {cause}")
        self.url = url  # password masked
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (RegistryUnreachableError, (self.url, self.cause))


class ProtocolError(MeshError):
    """Bytes received do not form a valid meshkit message."""

    def __init__(self, code: str, message: str, id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.id = id  # the request id, when the header was readable; else 0

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProtocolError, (self.code, str(self), self.id))


class CallError(MeshError):
    """A call or publish failed; ``code`` is the stable wire code."""

    code = "call_error"

    def __init__(self, message: str = "", *, service: str = "", method: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.service = service
        self.method = method

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.service, self.method))


def _rebuild(cls: type[CallError], message: str, service: str, method: str) -> CallError:
    if issubclass(cls, RefusedError):
        match = _CLIENT_CODE.fullmatch(message)
        if match is not None:
            return cls(match.group(2), client_code=int(match.group(1)), service=service, method=method)
    return cls(message, service=service, method=method)


class NoInstanceError(CallError):
    """No live instance of the service is registered (or none came up in time)."""

    code = "no_instance"


class CallTimeoutError(CallError):
    """The call's deadline passed before a reply arrived."""

    code = "timeout"


class LostPeerError(CallError):
    """The instance stopped answering while a non-idempotent call was in flight.

    The call may or may not have run; meshkit only retries it automatically
    when the method is declared ``idempotent``.
    """

    code = "lost_peer"


class MessageTooLargeError(CallError):
    """The encoded message exceeds the configured maximum message size."""

    code = "too_large"


class RemoteError(CallError):
    """The remote instance answered with an error."""

    code = "remote_error"


class UnknownServiceError(RemoteError):
    """The instance reached is not the service that was asked for."""

    code = "unknown_service"


class UnknownMethodError(RemoteError):
    """The service has no ``@rpc`` method of that name."""

    code = "unknown_method"


class BadArgumentsError(RemoteError):
    """The arguments do not match the method's signature."""

    code = "bad_arguments"


class BadRequestError(RemoteError):
    """The instance could not decode the request (bad frames, header or payload)."""

    code = "bad_request"


class UnsupportedVersionError(RemoteError):
    """The instance does not speak the protocol version the request used."""

    code = "unsupported_version"


class HandlerError(RemoteError):
    """The remote handler raised.

    ``remote_type`` is the exception's class name (not an import path) and
    ``remote_traceback`` is only filled when the remote runs in debug mode.
    """

    code = "handler_error"

    def __init__(
        self,
        message: str = "",
        *,
        service: str = "",
        method: str = "",
        remote_type: str = "",
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(message, service=service, method=method)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.message}" if self.remote_type else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handler_error, (self.message, self.service, self.method,
                                         self.remote_type, self.remote_traceback))


def _rebuild_handler_error(message: str, service: str, method: str, remote_type: str,
                           remote_traceback: str | None) -> HandlerError:
    return HandlerError(message, service=service, method=method, remote_type=remote_type,
                        remote_traceback=remote_traceback)


class RefusedError(RemoteError):
    """The handler refused the request on purpose (raise it to answer an error, not to report a bug).

    The server sends it back as it is, with no traceback logged: a refusal is
    an answer. ``client_code``, when set, is the numeric error a gateway gives
    its client (a Stratum pool's ``23`` for a low-difficulty share); on the
    wire it leads the message as ``"[23] "``.
    """

    code = "refused"

    def __init__(self, message: str = "", *, client_code: int | None = None, service: str = "",
                 method: str = "") -> None:
        super().__init__(message, service=service, method=method)
        self.client_code = client_code

    @property
    def wire_message(self) -> str:
        """The message as sent: ``client_code`` in front of it, in brackets."""
        return self.message if self.client_code is None else f"[{self.client_code}] {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_refused, (type(self), self.message, self.client_code, self.service, self.method))


def _rebuild_refused(cls: type[RefusedError], message: str, client_code: int | None, service: str,
                     method: str) -> RefusedError:
    return cls(message, client_code=client_code, service=service, method=method)


class UnknownConnectionError(RefusedError):
    """A gateway has no open connection with that id (it closed, or never was)."""

    code = "unknown_connection"


_CLIENT_CODE = re.compile(r"\[(-?\d{1,9})\] (.*)", re.DOTALL)


# Codes the server may send that the client handles itself.
DRAINING = "draining"
DEADLINE_EXCEEDED = "deadline_exceeded"
REPLY_TOO_LARGE = "reply_too_large"
OVERLOADED = "overloaded"

_BY_CODE: dict[str, type[CallError]] = {
    cls.code: cls
    for cls in (
        NoInstanceError,
        CallTimeoutError,
        LostPeerError,
        MessageTooLargeError,
        RemoteError,
        UnknownServiceError,
        UnknownMethodError,
        BadArgumentsError,
        BadRequestError,
        UnsupportedVersionError,
        HandlerError,
        RefusedError,
        UnknownConnectionError,
    )
}
_BY_CODE[DEADLINE_EXCEEDED] = CallTimeoutError
_BY_CODE[REPLY_TOO_LARGE] = MessageTooLargeError


# -- begin: error codes of subsystems (gateway, issue #9 item 2) --------------------------
def register_code(cls: type[RefusedError]) -> type[RefusedError]:
    """Make ``cls.code`` a known wire code, so a caller receiving it raises ``cls`` (a decorator).

    For refusals that other processes act on by code, never by class name
    (the gateway's ``connection_gone``, ``client_fault``, ``ban_client``).
    A code another class already holds is a ``ValueError``.
    """
    known = _BY_CODE.get(cls.code)
    if known is not None and known is not cls:
        raise ValueError(f"error code {cls.code!r} is already {known.__name__}'s")
    _BY_CODE[cls.code] = cls
    return cls
# -- end: error codes of subsystems --------------------------------------------------------


def error_from_wire(
    code: str,
    message: str,
    *,
    service: str = "",
    method: str = "",
    remote_type: str = "",
    remote_traceback: str | None = None,
) -> CallError:
    """Build the exception for an error code received from the wire.

    Unknown codes (from a newer peer) become a plain :class:`RemoteError`
    whose message keeps the code, so nothing is silently reclassified.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(f"[{code}] {message}", service=service, method=method)
    if cls is HandlerError:
        return HandlerError(
            message,
            service=service,
            method=method,
            remote_type=remote_type,
            remote_traceback=remote_traceback,
        )
    if issubclass(cls, RefusedError):
        match = _CLIENT_CODE.fullmatch(message)
        if match is not None:
            return cls(match.group(2), client_code=int(match.group(1)), service=service, method=method)
    return cls(message, service=service, method=method)
