"""The JSON-RPC error codes a gateway answers with (part of :mod:`meshkit.gateway.jsonrpc`'s protocol).

:data:`REASONS` gives each code its stable string (``error.data.code``),
:func:`error_for` turns a failed mesh call into ``(code, message, data)``,
and a call function raises :class:`RpcError` to fail a request with a code
of its choosing. Texts quoted from a backend are clipped (a message may echo
the client's own arguments).

Error codes
-----------
``data`` is always an object whose ``"code"`` is a stable string: the mesh
error code when a backend answered (``unknown_method``, ``bad_arguments``,
...), else the name below. For ``handler_error`` it also carries ``"type"``,
the exception's class name. Codes marked *closes* are sent with
``id`` null right before the gateway closes the connection; every other error
leaves the connection open.

======  ====================  =====================================================
-32700  parse_error           the line is not valid JSON (``id`` null)
-32600  invalid_request       not a JSON-RPC 2.0 request object (empty batch, no
                              ``method``, ``params`` not an array or object, an
                              ``id`` that is not a string, a finite number or null)
-32601  method_not_found      ``method`` is not ``SERVICE.METHOD``, the service is
                              unknown to the gateway, or has no such method
-32602  invalid_params        the arguments do not fit the method (or, for the
                              ``mesh.*`` methods, a topic is not forwarded by this
                              gateway, or one subscription too many)
-32603  internal_error        anything else that went wrong inside the mesh
-32000  timeout               no answer before the request's deadline (including
                              waiting for a backend instance to come up)
-32001  no_instance           no backend instance of the service is available
-32002  lost_peer             the backend died with the request in flight; it may
                              or may not have run (only non-idempotent methods)
-32003  too_many_in_flight    the connection already has the maximum number of
                              requests in flight; this one was not run
-32004  line_too_long         the line exceeded the maximum length and was skipped
                              up to its newline (``id`` null)
-32005  handler_error         the backend's handler raised; ``message`` is
                              ``"<Type>: <text>"``
-32006  too_many_connections  the gateway is full (*closes*)
-32007  idle_timeout          nothing received for too long (*closes*)
-32008  shutting_down         the gateway is stopping; reconnect (*closes*)
-32009  slow_consumer         the client stopped reading; it is dropped without
                              this error (it would not read it), which names
                              the reason in metrics and logs
-32010  batch_too_large       the batch holds more than ``max_batch`` items; none
                              of them was run (``id`` null)
-32011  banned                the client's address is banned (``data.until``:
                              unix time it ends) (*closes*)
-32012  rate_limited          more requests per second than the connection may
                              send; this one was not run
-32013  address_limited       too many connections from the client's address, or
                              connecting too fast (``data.reason``) (*closes*)
-32014  resource_exhausted    a cluster-wide resource the backend method uses is
                              at its limit (``docs/limits.md``); it was not run
(any)   refused               the backend refused the request on purpose
                              (:class:`~meshkit.errors.RefusedError`): its
                              ``client_code`` is the code (-32005 without one)
                              and its message the message, nothing prefixed
======  ====================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CallError, HandlerError, MeshError, RefusedError
from ..untrusted import clip

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
TIMEOUT = -32000
NO_INSTANCE = -32001
LOST_PEER = -32002
TOO_MANY_IN_FLIGHT = -32003
LINE_TOO_LONG = -32004
HANDLER_ERROR = -32005
TOO_MANY_CONNECTIONS = -32006
IDLE_TIMEOUT = -32007
SHUTTING_DOWN = -32008
SLOW_CONSUMER = -32009
BATCH_TOO_LARGE = -32010
BANNED = -32011
RATE_LIMITED = -32012
ADDRESS_LIMITED = -32013
RESOURCE_EXHAUSTED = -32014

# Longest mesh error message passed on to a client: a backend's message may
# quote the client's own arguments back.
_MESSAGE_LIMIT = 1000

#: The stable string for each numeric code (``error.data.code``).
REASONS: Mapping[int, str] = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    TIMEOUT: "timeout",
    NO_INSTANCE: "no_instance",
    LOST_PEER: "lost_peer",
    TOO_MANY_IN_FLIGHT: "too_many_in_flight",
    LINE_TOO_LONG: "line_too_long",
    HANDLER_ERROR: "handler_error",
    TOO_MANY_CONNECTIONS: "too_many_connections",
    IDLE_TIMEOUT: "idle_timeout",
    SHUTTING_DOWN: "shutting_down",
    SLOW_CONSUMER: "slow_consumer",
    BATCH_TOO_LARGE: "batch_too_large",
    BANNED: "banned",
    RATE_LIMITED: "rate_limited",
    ADDRESS_LIMITED: "address_limited",
}

# Mesh error codes (meshkit.errors) and the JSON-RPC code each becomes.
_FROM_MESH: Mapping[str, int] = {
    "timeout": TIMEOUT,
    "no_instance": NO_INSTANCE,
    "lost_peer": LOST_PEER,
    "unknown_service": METHOD_NOT_FOUND,
    "unknown_method": METHOD_NOT_FOUND,
    "bad_arguments": INVALID_PARAMS,
    "handler_error": HANDLER_ERROR,
    "resource_exhausted": RESOURCE_EXHAUSTED,
}


def error_for(exc: CallError) -> tuple[int, str, dict[str, Any]]:
    """The JSON-RPC ``(code, message, data)`` for a failed mesh call."""
    code = _FROM_MESH.get(exc.code, INTERNAL_ERROR)
    data: dict[str, Any] = {"code": clip(exc.code, 60)}
    if isinstance(exc, RefusedError) and exc.code not in _FROM_MESH:  # not a limit's refusal
        # The backend chose this answer: its number (if any) and its words, nothing added.
        code = exc.client_code if exc.client_code is not None else HANDLER_ERROR
        return code, clip(exc.message, _MESSAGE_LIMIT), data
    if isinstance(exc, HandlerError) and exc.remote_type:
        data["type"] = clip(exc.remote_type, 200)
    return code, clip(str(exc), _MESSAGE_LIMIT), data


class RpcError(MeshError):
    """Raised by a call function: the request fails with this JSON-RPC error."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
