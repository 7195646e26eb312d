"""The meshkit wire protocol, version 1. This docstring is the specification.

Transport
---------
Every service instance binds one ZeroMQ ``ROUTER`` socket (ZMTP 3 over TCP).
A peer talks to it through a ``DEALER`` socket connected to the endpoint the
instance registered. Every message is a ZeroMQ multipart message of exactly
**two frames**, ``[header, body]``, as sent by the DEALER (the ROUTER sees its
own routing-id frame in front, and puts it back in front of its answer). Both
frames are MessagePack (https://msgpack.org): strings are ``str`` (UTF-8),
binary data is ``bin``; maps may have non-string keys.

Header
------
A MessagePack array whose first three items are always::

    [version, kind, id]

``version`` is the integer ``1``. ``kind`` is one of the integers below.
``id`` is an unsigned 64-bit integer chosen by the sender of a request and
echoed in its answer; a peer must not reuse an id while the request is in
flight. Requests (CALL, PUSH) carry five more items::

    [version, kind, id, target, name, timeout_ms, traceparent, meta]

=============  =====================================================================
target         CALL: the service name the sender means to reach. PUSH: ``""``.
name           CALL: the method name. PUSH: the topic.
timeout_ms     time left until the caller's deadline, in milliseconds at the moment
               of sending (an int >= 0), or nil for no deadline. The receiver
               measures its own deadline from when it received the message; work
               whose deadline has passed is not started.
traceparent    W3C trace context ``00-<32 hex trace id>-<16 hex parent span>-<2 hex
               flags>`` (a str), or nil. The receiver's span is its child.
meta           map of str to str passed from caller to callee and on to nested calls
               (the gateway puts its client connection id under ``"conn"``), or nil.
=============  =====================================================================

Answers (REPLY, ERROR, ACK, PONG) and PING carry only the three common items.

Kinds and bodies
----------------
====  =====  ===============================================================
kind  name   body
====  =====  ===============================================================
1     CALL   ``[args, kwargs]``: an array of positional arguments and a map of
             keyword arguments (str keys). Answered by REPLY or ERROR.
2     REPLY  the return value: any MessagePack value.
3     ERROR  a map ``{"code": str, "message": str}`` plus, for ``handler_error``,
             ``"type"`` (the exception's class name) and, only when the server
             runs in debug mode, ``"traceback"`` (str).
4     PUSH   the published payload: any MessagePack value. Answered by ACK once
             the subscriber's handler has run (or ERROR if it raised).
5     ACK    nil.
6     PING   nil. Answered by PONG: a cheap "are you there, and how busy?" for
             tools and other clients (meshkit's own client relies on the
             connection's state and ZMTP heartbeats instead).
7     PONG   ``[state, inflight]``: the instance's state (``"up"`` or
             ``"draining"``) and how many requests it is serving.
====  =====  ===============================================================

Error codes
-----------
Stable strings; new codes may be added, so a client must treat an unknown
code as a generic remote error.

=====================  ============================================================
unknown_service        the instance is not the service named in ``target``
unknown_method         no such method, or no handler for the topic
bad_arguments          the arguments do not fit the method's signature
bad_request            malformed message: wrong frame count, header or body not
                       MessagePack, wrong item types (``id`` 0 when unknown)
unsupported_version    header version is not 1; the message lists supported ones
handler_error          the handler raised; ``type`` and ``message`` describe it
refused                the handler refused on purpose (``RefusedError``); a message
                       starting ``"[N] "`` carries a client-facing code ``N``
unknown_connection     (a gateway's ``gateway.deliver`` PUSH) no such open connection
deadline_exceeded      the deadline passed before the work started; not run
draining               the instance is shutting down and did not start the work;
                       the caller should send it to another instance
reply_too_large        the result exceeded the server's maximum message size
overloaded             past a receiver limit: too many calls in flight or pushes queued
                       for this connection, or the instance holds too much (in
                       requests or bytes), or a method's or service's concurrency
                       limit and its queue are full; not run (a publisher counts
                       it undelivered)
resource_exhausted     a named resource the method uses is at its cluster-wide limit
                       and the method does not wait for it; not run
====================================================================================

A server answers every request it can attribute to a sender, including
malformed ones (with ``bad_request``). Messages larger than the receiver's
maximum message size are dropped by ZeroMQ itself (the connection is reset),
so a sender must check sizes before sending.

Limits
------
What a peer can make a receiver hold (calls in flight and pushes queued, per
connection and in all) is bounded in requests and in bytes, and a request
past a bound is answered ``overloaded`` (see ``docs/protocol.md``, "Receiver
limits", and :mod:`meshkit.budget`). A receiver also refuses, with
``bad_request``, a header frame longer than ``max_header_size`` bytes
(default :data:`MAX_HEADER_SIZE`, 64 KiB) and a ``target`` or ``name``
longer than ``max_name_length`` characters (default :data:`MAX_NAME_LENGTH`,
256). The id of a malformed header is echoed whenever its first three items
can be read from the first :data:`meshkit.decoder.ID_PEEK_BYTES` bytes (4 KiB),
whatever follows them and however deeply they are nested. Values echoed into
error messages are clipped (:func:`meshkit.untrusted.clip`), and an ERROR
body's fields are bounded on decoding (:data:`MAX_ERROR_MESSAGE` characters
of message, and so on), so an answer is never larger than a few kilobytes
because of what a peer sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

# Re-exported (``as``): the bounded decoding is part of what this module offers.
from .decoder import CONTAINER_COST as CONTAINER_COST
from .decoder import MAX_BODY_CONTAINERS as MAX_BODY_CONTAINERS
from .decoder import peek_id as peek_id
from .decoder import unpack_body as unpack_body
from .decoder import why
from .errors import ProtocolError
from .untrusted import clip

VERSION = 1
SUPPORTED_VERSIONS = (1,)

CALL = 1
REPLY = 2
ERROR = 3
PUSH = 4
ACK = 5
PING = 6
PONG = 7

KIND_NAMES = {
    CALL: "CALL",
    REPLY: "REPLY",
    ERROR: "ERROR",
    PUSH: "PUSH",
    ACK: "ACK",
    PING: "PING",
    PONG: "PONG",
}
_REQUEST_KINDS = frozenset((CALL, PUSH))
_ANSWER_KINDS = frozenset((REPLY, ERROR, ACK, PING, PONG))

_NIL = b"\xc0"
_MAX_ID = 2**64 - 1

# Defaults of the receiver's limits (Settings.max_header_size, .max_name_length).
# A request header is eight short items: 64 KiB leaves room for a large meta
# map, and bounds what a malformed header can cost to decode.
MAX_HEADER_SIZE = 64 * 1024
# Method, topic and service names; 256 is far beyond any real one, and bounds
# what a subscriber's topic cache can hold per entry.
MAX_NAME_LENGTH = 256
# Bounds on a decoded ERROR body (characters), whatever the peer sent.
MAX_ERROR_CODE = 64
MAX_ERROR_MESSAGE = 2000
MAX_ERROR_TYPE = 120
MAX_ERROR_TRACEBACK = 32 * 1024


@dataclass(slots=True)
class Header:
    """A decoded header. Request fields are empty for answers and PING."""

    version: int
    kind: int
    id: int
    target: str = ""
    name: str = ""
    timeout_ms: int | None = None
    traceparent: str | None = None
    meta: dict[str, str] | None = None

    @property
    def is_request(self) -> bool:
        return self.kind in _REQUEST_KINDS


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """The decoded body of an ERROR message."""

    code: str
    message: str
    type: str = ""
    traceback: str | None = None


def pack(value: Any) -> bytes:
    """Encode one body value (raises ``TypeError`` for non-MessagePack values)."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(frame: bytes) -> Any:
    """Decode one frame; raise :class:`ProtocolError` ``bad_request`` if it is not MessagePack."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types (StackError for deep nesting)
        raise ProtocolError("bad_request", f"frame is not valid MessagePack: {why(exc)}") from None


def encode_call(
    id: int,
    service: str,
    method: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    timeout_ms: int | None,
    traceparent: str | None,
    meta: Mapping[str, str] | None,
) -> list[bytes]:
    """Frames of a CALL."""
    return [encode_call_header(id, service, method, timeout_ms, traceparent, meta),
            pack([list(args), dict(kwargs)])]


def encode_call_header(
    id: int, service: str, method: str, timeout_ms: int | None, traceparent: str | None,
    meta: Mapping[str, str] | None,
) -> bytes:
    """Encode a CALL header (the client encodes the body once, before any retry)."""
    return pack([VERSION, CALL, id, service, method, timeout_ms, traceparent, meta or None])


def encode_push(
    id: int,
    topic: str,
    payload: Any,
    timeout_ms: int | None,
    traceparent: str | None,
    meta: Mapping[str, str] | None,
) -> list[bytes]:
    """Frames of a PUSH."""
    return [encode_push_header(id, topic, timeout_ms, traceparent, meta), pack(payload)]


def encode_push_body(payload: Any) -> bytes:
    """Encode a PUSH body once, to send it to many subscribers."""
    return pack(payload)


def encode_push_header(
    id: int, topic: str, timeout_ms: int | None, traceparent: str | None, meta: Mapping[str, str] | None
) -> bytes:
    """Encode a PUSH header (the body is encoded once per publish)."""
    return pack([VERSION, PUSH, id, "", topic, timeout_ms, traceparent, meta or None])


def encode_answer_header(kind: int, id: int) -> bytes:
    """Header of a REPLY, ERROR, ACK, PING or PONG."""
    return pack([VERSION, kind, id])


def encode_reply(id: int, result: Any) -> list[bytes]:
    """Frames of a REPLY (raises ``TypeError`` if ``result`` is not MessagePack-able)."""
    return [pack([VERSION, REPLY, id]), pack(result)]


def encode_error(
    id: int, code: str, message: str, type: str = "", traceback: str | None = None
) -> list[bytes]:
    """Frames of an ERROR."""
    body: dict[str, str] = {"code": code, "message": message}
    if type:
        body["type"] = type
    if traceback:
        body["traceback"] = traceback
    return [pack([VERSION, ERROR, id]), pack(body)]


def encode_ack(id: int) -> list[bytes]:
    """Frames of an ACK."""
    return [pack([VERSION, ACK, id]), _NIL]


def encode_ping(id: int) -> list[bytes]:
    """Frames of a PING."""
    return [pack([VERSION, PING, id]), _NIL]


def encode_pong(id: int, state: str, inflight: int) -> list[bytes]:
    """Frames of a PONG."""
    return [pack([VERSION, PONG, id]), pack([state, inflight])]


def decode_header(
    frame: bytes, *, max_size: int = MAX_HEADER_SIZE, max_name: int = MAX_NAME_LENGTH
) -> Header:
    """Decode and validate a header frame.

    Raises :class:`ProtocolError` with code ``bad_request`` for anything
    malformed (including a frame over ``max_size`` bytes and a target or name
    over ``max_name`` characters) and ``unsupported_version`` for a version
    other than 1. ``exc.id`` is the request id when it could be read (see
    :func:`meshkit.decoder.peek_id`), else 0. Never raises anything else, and the error
    message is short whatever the frame holds.
    """
    if len(frame) > max_size:
        raise ProtocolError("bad_request", f"header of {len(frame)} bytes exceeds the limit of {max_size}",
                            peek_id(frame))
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # several unrelated types, StackError for deep nesting
        raise ProtocolError("bad_request", f"header is not valid MessagePack: {why(exc)}",
                            peek_id(frame)) from None
    if not isinstance(raw, list) or len(raw) < 3:
        raise ProtocolError("bad_request", "header must be an array of at least 3 items")
    version, kind, id = raw[0], raw[1], raw[2]
    if type(id) is not int or not 0 <= id <= _MAX_ID:
        raise ProtocolError("bad_request", "header id must be an unsigned 64-bit integer")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {clip(version)} is not supported (supported: {list(SUPPORTED_VERSIONS)})",
            id,
        )
    if type(kind) is not int:
        raise _bad(id, f"message kind must be an integer, got {clip(kind)}")
    if kind in _ANSWER_KINDS:
        if len(raw) != 3:
            raise _bad(id, f"{KIND_NAMES[kind]} header must have 3 items")
        return Header(version, kind, id)
    if kind not in _REQUEST_KINDS:
        raise _bad(id, f"unknown message kind {clip(kind)}")
    if len(raw) != 8:
        raise _bad(id, f"{KIND_NAMES[kind]} header must have 8 items, got {len(raw)}")
    return _request_header(raw, max_name)


def _request_header(raw: list[Any], max_name: int) -> Header:
    version, kind, id, target, name, timeout_ms, traceparent, meta = raw
    if type(target) is not str or type(name) is not str or not name:
        raise _bad(id, "target must be a string and name a non-empty string")
    if len(target) > max_name or len(name) > max_name:
        raise _bad(id, f"target and name may have at most {max_name} characters, "
                       f"got {len(target)} and {len(name)}")
    if timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms < 0):
        raise _bad(id, "timeout_ms must be a non-negative integer or nil")
    if traceparent is not None and type(traceparent) is not str:
        raise _bad(id, "traceparent must be a string or nil")
    if meta is not None and (
        type(meta) is not dict
        or not all(type(k) is str and type(v) is str for k, v in meta.items())
    ):
        raise _bad(id, "meta must be a map of strings to strings or nil")
    return Header(version, kind, id, target, name, timeout_ms, traceparent, meta)


def decode_call_body(frame: bytes, id: int) -> tuple[list[Any], dict[str, Any]]:
    """Decode a CALL body into ``(args, kwargs)``; ``bad_request`` if malformed."""
    args, kwargs, _ = decode_call(frame, id)
    return args, kwargs


def decode_call(
    frame: bytes, id: int, max_containers: int = MAX_BODY_CONTAINERS
) -> tuple[list[Any], dict[str, Any], int]:
    """Decode a CALL body into ``(args, kwargs, containers)`` (see :func:`unpack_body`)."""
    try:
        body, containers = unpack_body(frame, max_containers)
    except ProtocolError as exc:
        raise _bad(id, str(exc)) from None
    if (
        type(body) is not list
        or len(body) != 2
        or type(body[0]) is not list
        or type(body[1]) is not dict
        or not all(type(k) is str for k in body[1])
    ):
        raise _bad(id, "CALL body must be [array of args, map of str to kwargs]")
    return body[0], body[1], containers


def decode_error_body(frame: bytes) -> ErrorBody:
    """Decode an ERROR body; tolerate missing fields from other implementations."""
    body = unpack(frame)
    if type(body) is not dict:
        return ErrorBody("bad_request", f"malformed ERROR body: {clip(body)}")
    code = body.get("code")
    message = body.get("message")
    etype = body.get("type")
    tb = body.get("traceback")
    # Bounded here, once: the fields become exception text that callers log and
    # pass on (a gateway shows them to its clients).
    return ErrorBody(
        _bounded(code, MAX_ERROR_CODE) if isinstance(code, str) else "remote_error",
        _bounded(message, MAX_ERROR_MESSAGE) if isinstance(message, str) else "",
        _bounded(etype, MAX_ERROR_TYPE) if isinstance(etype, str) else "",
        _bounded(tb, MAX_ERROR_TRACEBACK) if isinstance(tb, str) else None,
    )


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else clip(text, limit)


def _bad(id: int, message: str) -> ProtocolError:
    return ProtocolError("bad_request", message, id)
