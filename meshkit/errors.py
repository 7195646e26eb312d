"""Every exception meshkit raises, rooted at :class:`MeshError`.

The tree says whose fault a failure is (``tests/unit/test_errors.py`` pins
it against the classes, subpackages included)::

    MeshError
    ├── ConfigError                 your settings are wrong (raised before anything runs)
    ├── ClientClosedError           you used a client or service after closing it
    ├── RegistryUnreachableError    the registry's Redis did not answer (not: "no instances")
    ├── ProtocolError               bytes that are not valid meshkit frames (local decode)
    ├── CallError                   a call or publish did not produce a result
    │   ├── NoInstanceError         no live instance of the service is known      [no_instance]
    │   ├── CallTimeoutError        the deadline passed before a reply (a TimeoutError too) [timeout]
    │   ├── LostPeerError           the instance died with the call in flight     [lost_peer]
    │   ├── MessageTooLargeError    the request exceeded the size limit           [too_large]
    │   └── RemoteError             the instance answered with an error
    │       ├── UnknownServiceError      the instance is not that service    [unknown_service]
    │       ├── UnknownMethodError       no such @rpc method                 [unknown_method]
    │       ├── BadArgumentsError        arguments do not fit the method     [bad_arguments]
    │       ├── BadRequestError          the instance could not decode it    [bad_request]
    │       ├── UnsupportedVersionError  protocol version not spoken         [unsupported_version]
    │       ├── HandlerError             the handler raised                  [handler_error]
    │       ├── ForbiddenError           the access policy refused the caller [forbidden]
    │       └── RefusedError             the handler refused on purpose      [refused]
    │           ├── UnknownConnectionError  no open gateway connection has that id [unknown_connection]
    │           ├── ResourceExhaustedError  a cluster-wide resource limit is reached [resource_exhausted]
    │           ├── Overloaded           (limits) a concurrency gate and its queue are full [overloaded]
    │           ├── FanoutFullError      (gateway) its ordered push queue is full [overloaded]
    │           ├── ClientFaultError     (gateway) a handler blames the gateway's client [client_fault]
    │           │   └── BanClientError       ... and asks for its address to be banned [ban_client]
    │           └── ConnectionGoneError  (gateway) the client connection closed [connection_gone]
    ├── HAProxyError                (haproxy) HAProxy could not be driven
    │   ├── HAProxyUnreachableError     its runtime API or master CLI did not answer
    │   ├── RuntimeCommandError         it refused a runtime command
    │   ├── ConfigCheckError            ``haproxy -c`` rejected a rendered configuration
    │   └── ReloadError                 a reload did not bring up a new worker
    ├── StackError                  (stack) a Circus control command failed
    │   └── RestartFailed               a rolling restart stopped part-way
    ├── NoConnectionError           (gateway) the call did not come through a gateway
    ├── ProxyHeaderError            (gateway) not a valid PROXY protocol header
    ├── RpcError                    (gateway) a call function's JSON-RPC error
    ├── LocalRedisError             (cli) the background Redis could not be started or stopped
    └── UsageError                  (cli) the command line is wrong

Errors cross the wire as the stable string codes in brackets (the
vocabulary is :mod:`meshkit.codes`), never as pickles or import paths.
``draining`` and ``deadline_exceeded`` are codes the client consumes itself:
the first makes it retry on another instance, the second becomes
:class:`CallTimeoutError`. A service defines its own codes by subclassing
:class:`RefusedError` and calling :func:`register_error_code`: its handlers
raise the class, the code travels, and the caller gets the class back.
"""

from __future__ import annotations

import re
from typing import Any

from .codes import ErrorCode, LocalCode


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

    code: str = LocalCode.REGISTRY_UNREACHABLE

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"registry unreachable at {url}: {cause}")
        self.url = url  # password masked
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (RegistryUnreachableError, (self.url, self.cause))


class ProtocolError(MeshError):
    """Bytes received do not form a valid meshkit message."""

    def __init__(self, code: str, message: str, id: int = 0) -> None:
        super().__init__(message)  # ``code`` is an ErrorCode (bad_request, unsupported_version)
        self.code = code
        self.id = id  # the request id, when the header was readable; else 0

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProtocolError, (self.code, str(self), self.id))


class CallError(MeshError):
    """A call or publish failed; ``code`` is the stable wire code."""

    code: str = LocalCode.CALL_ERROR

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

    code = LocalCode.NO_INSTANCE


class CallTimeoutError(CallError, TimeoutError):
    """The call's deadline passed before a reply arrived (also a built-in :class:`TimeoutError`)."""

    code = LocalCode.TIMEOUT


class LostPeerError(CallError):
    """The instance stopped answering while a non-idempotent call was in flight.

    The call may or may not have run; meshkit only retries it automatically
    when the method is declared ``idempotent``.
    """

    code = LocalCode.LOST_PEER


class MessageTooLargeError(CallError):
    """The encoded message exceeds the configured maximum message size."""

    code = LocalCode.TOO_LARGE


class RemoteError(CallError):
    """The remote instance answered with an error."""

    code: str = LocalCode.REMOTE_ERROR


class UnknownServiceError(RemoteError):
    """The instance reached is not the service that was asked for."""

    code = ErrorCode.UNKNOWN_SERVICE


class UnknownMethodError(RemoteError):
    """The service has no ``@rpc`` method of that name."""

    code = ErrorCode.UNKNOWN_METHOD


class BadArgumentsError(RemoteError):
    """The arguments do not match the method's signature."""

    code = ErrorCode.BAD_ARGUMENTS


class BadRequestError(RemoteError):
    """The instance could not decode the request (bad frames, header or payload)."""

    code = ErrorCode.BAD_REQUEST


class UnsupportedVersionError(RemoteError):
    """The instance does not speak the protocol version the request used."""

    code = ErrorCode.UNSUPPORTED_VERSION


class HandlerError(RemoteError):
    """The remote handler raised.

    ``remote_type`` is the exception's class name (not an import path) and
    ``remote_traceback`` is only filled when the remote runs in debug mode.
    """

    code = ErrorCode.HANDLER_ERROR

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


class ForbiddenError(RemoteError):
    """The instance's access policy does not let this caller make this call or push (docs/security.md)."""

    code = ErrorCode.FORBIDDEN


class RefusedError(RemoteError):
    """The handler refused the request on purpose (raise it to answer an error, not to report a bug).

    The server sends it back as it is, with no traceback logged: a refusal is
    an answer. ``client_code``, when set, is the numeric error a gateway gives
    its client (a Stratum pool's ``23`` for a low-difficulty share); on the
    wire it leads the message as ``"[23] "``.
    """

    code: str = ErrorCode.REFUSED  # str: subclasses registered by services bring their own codes

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

    code = ErrorCode.UNKNOWN_CONNECTION


class ResourceExhaustedError(RefusedError):
    """A named resource the method uses (``@rpc(uses=...)``) is at its cluster-wide limit; not run.

    Raised by the server before the handler when the method does not wait for
    the resource (or its deadline would pass first); see ``docs/limits.md``.
    """

    code = ErrorCode.RESOURCE_EXHAUSTED


_CLIENT_CODE = re.compile(r"\[(-?\d{1,9})\] (.*)", re.DOTALL)


# Codes the server may send that the client handles itself (kept as names for importers).
DRAINING = ErrorCode.DRAINING
DEADLINE_EXCEEDED = ErrorCode.DEADLINE_EXCEEDED
REPLY_TOO_LARGE = ErrorCode.REPLY_TOO_LARGE
OVERLOADED = ErrorCode.OVERLOADED
FORBIDDEN = ErrorCode.FORBIDDEN

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
        ForbiddenError,
        RefusedError,
        UnknownConnectionError,
        ResourceExhaustedError,
    )
}
_BY_CODE[DEADLINE_EXCEEDED] = CallTimeoutError
_BY_CODE[REPLY_TOO_LARGE] = MessageTooLargeError
_BUILT_IN = frozenset(_BY_CODE) | frozenset(ErrorCode) | frozenset(LocalCode)
_CODE_GRAMMAR = re.compile(r"[a-z][a-z0-9_]{0,63}")


def register_error_code(cls: type[RefusedError]) -> type[RefusedError]:
    """Make ``cls.code`` a wire code that is rebuilt as ``cls`` when received (usable as a decorator).

    ``cls`` must subclass :class:`RefusedError` (a handler raises it to
    answer with that code) and define its own ``code``: 1-64 characters of
    ``a-z``, ``0-9`` and ``_``, starting with a letter, not one of meshkit's
    own (:mod:`meshkit.codes`). Registering the same class again is a no-op;
    another class for a registered code is a ``ValueError``.
    """
    if not (isinstance(cls, type) and issubclass(cls, RefusedError)):
        raise TypeError(f"{cls!r} must be a RefusedError subclass")
    code = cls.__dict__.get("code")
    if not isinstance(code, str) or _CODE_GRAMMAR.fullmatch(code) is None:
        raise ValueError(f"{cls.__name__}.code must match {_CODE_GRAMMAR.pattern}, got {code!r}")
    if code in _BUILT_IN:
        raise ValueError(f"{code!r} is one of meshkit's own codes")
    known = _BY_CODE.get(code)
    if known is not None and known is not cls:
        raise ValueError(f"code {code!r} is already registered for {known.__qualname__}")
    _BY_CODE[code] = cls
    return cls


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
