"""The meshkit wire protocol, version 1: the codec, and the summary of its spec.

The full specification, for implementers in other languages, is
``docs/protocol.md``; this summary and the golden vectors in
``tests/unit/test_wire.py`` are kept in step with it.

Every instance binds one ZeroMQ ``ROUTER``; peers talk to it through a
``DEALER``. Every message is **two frames**, ``[header, body]`` (or a batch of such pairs, below), both
MessagePack (strings ``str``, binary ``bin``, maps may have non-string keys).
The header is ``[version, kind, id]`` for answers, PING, CANCEL, ITEM and CREDIT, and
``[version, kind, id, target, name, timeout_ms, traceparent, meta]`` for
requests: ``version`` 1; ``id`` an unsigned 64-bit int chosen by the
requester, echoed in the answer, not reused while in flight; ``target`` the
service (PUSH: ``""``); ``name`` the method or topic; ``timeout_ms`` the time
left in whole milliseconds, rounded down (nil: no deadline); ``traceparent``
W3C trace context or nil; ``meta`` a str-to-str map or nil.

====  =====  ===============================================================
kind  name   body
====  =====  ===============================================================
1     CALL   ``[args, kwargs]``. Answered by REPLY or ERROR.
2     REPLY  the return value.
3     ERROR  ``{"code", "message"}`` (+ ``"type"``, ``"traceback"`` in debug mode,
             ``"supported"`` versions for ``unsupported_version``).
4     PUSH   the payload. Answered by ACK once the handlers ran, or ERROR.
5     ACK    nil.
6     PING   nil. Answered by PONG.
7     PONG   ``[state, inflight]``: ``"up"``/``"draining"``, requests being served.
8     CANCEL nil or why: ``"cancelled"``, ``"deadline"``, ``"closed"``; ``id``
             names a CALL the sender still has in flight. Never answered. Sent only to an instance whose record lists
             ``"cancel"`` in ``features`` (version 1 peers without it answer
             an unknown kind ``bad_request``, which the caller drops).
9     ITEM   one item of a streamed CALL's answer; then REPLY nil or ERROR.
10    CREDIT the number of further ITEMs the caller can take (section 4, "Streams").
====  =====  ===============================================================

A **batch** is one ZeroMQ message of 2N frames (N >= 2), ``[h1, b1, h2, b2, ...]``,
each pair exactly what it would be alone, taken pair by pair by its receiver
(a malformed pair gets its own answer; an odd count is ``bad_request``). It is
sent only to an instance whose record lists ``"batch"`` in ``features``, and
answers are batched only on a connection that sent a batch; at most
:data:`MAX_BATCH_PAIRS` pairs and :data:`MAX_BATCH_BYTES` bytes, a pair that
big going alone (:func:`pack_batches`, :func:`pairs_of`).

Error codes are the stable strings of :class:`meshkit.codes.ErrorCode`; an
unknown one is a generic remote error. A server answers every request it can
attribute to a sender, malformed ones with ``bad_request`` (echoing the id
when it can be read, else 0); a client never answers an answer, and drops
and counts one it cannot read or match. A header over ``max_header_size``
bytes (:data:`MAX_HEADER_SIZE`) or a name over ``max_name_length``
characters (:data:`MAX_NAME_LENGTH`) is ``bad_request``; decoded ERROR fields
are bounded (:data:`MAX_ERROR_MESSAGE` ...).

Production encodes and decodes through this module alone: senders build a
:class:`CallMessage` or :class:`PushMessage` (body encoded once) and ask it for
each attempt's frames; servers use :func:`split_request`, clients :func:`decode_answer`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from .codes import ErrorCode, LocalCode

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
CANCEL = 8
ITEM = 9  # one item of a streamed call's answer (meshkit.streams)
CREDIT = 10  # a streaming caller can take this many more ITEMs

# What an instance's record lists in ``features`` when it understands CANCEL.
FEATURE_CANCEL = "cancel"
# ... and when it streams the items of async generator methods (ITEM, CREDIT; meshkit.streams).
FEATURE_STREAM = "stream"
# ... and when it takes (and answers with) batches: several messages' pairs in one ZeroMQ message.
FEATURE_BATCH = "batch"
FEATURES = (FEATURE_CANCEL, FEATURE_STREAM, FEATURE_BATCH)
# Why a caller cancelled (a CANCEL's body; nil and anything unknown read as CANCELLED).
CANCELLED = "cancelled"  # its waiting task was cancelled
DEADLINE = "deadline"  # its deadline passed: the callee treats it as its own deadline
CLOSED = "closed"  # its client (or the gateway connection it came through) closed
_CANCEL_REASONS = frozenset((CANCELLED, DEADLINE, CLOSED))

KIND_NAMES = {CALL: "CALL", REPLY: "REPLY", ERROR: "ERROR", PUSH: "PUSH", ACK: "ACK", PING: "PING",
              PONG: "PONG", CANCEL: "CANCEL", ITEM: "ITEM", CREDIT: "CREDIT"}
_REQUEST_KINDS = frozenset((CALL, PUSH))
_ANSWER_KINDS = frozenset((REPLY, ERROR, ACK, PING, PONG, CANCEL, ITEM, CREDIT))  # the kinds with a 3-item header
_ANSWERS_TO_CLIENTS = frozenset((REPLY, ERROR, ACK, PONG, ITEM))

# Bounds of a batch (section "Batches" of docs/protocol.md): a sender packs at
# most this many pairs and bytes into one message; a pair this big or bigger
# goes alone. A receiver serves at most MAX_BATCH_PAIRS pairs of a batch and
# answers each further one ``bad_request``.
MAX_BATCH_PAIRS = 64
MAX_BATCH_BYTES = 64 * 1024
# meshkit's senders send a batch as soon as it holds this many pairs, not at
# the end of the loop turn: the receiver starts on it while the sender makes
# the rest. One batch per turn made the two sides take turns (each idle while
# the other worked: 64 in flight moved as one block), 0.83x NATS pipelined
# against 1.18x with batches of 16 (bench/rpc.py medians, docs/protocol.md).
SEND_BATCH_PAIRS = 16

_NIL = b"\xc0"
_packers = threading.local()
_MAX_ID = 2**64 - 1

# Defaults of Settings.max_header_size and .max_name_length. 64 KiB leaves room
# for a large meta map and bounds what a malformed header costs to decode; 256
# characters is far beyond any real name and bounds a topic cache's entries.
MAX_HEADER_SIZE = 64 * 1024
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


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """The decoded body of an ERROR message."""

    code: str
    message: str
    type: str = ""
    traceback: str | None = None


def pack(value: Any) -> bytes:
    """Encode one value (raises ``TypeError`` for non-MessagePack values); thread-safe."""
    try:  # ``packb`` would build a Packer per call (5x the packing, profiled): one per thread
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(value)  # type: ignore[no-any-return]


def unpack(frame: bytes) -> Any:
    """Decode one frame; raise :class:`ProtocolError` ``bad_request`` if it is not MessagePack."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types (StackError for deep nesting)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame is not valid MessagePack: {why(exc)}") from None


def timeout_ms(seconds: float) -> int:
    """``timeout_ms`` for ``seconds`` left: whole milliseconds, rounded down, never negative."""
    return max(0, int(seconds * 1000))


@dataclass(slots=True)
class CallMessage:
    """A CALL as its sender holds it: the body encoded once, a header made per attempt."""

    service: str
    method: str
    body: bytes
    traceparent: str | None = None
    meta: Mapping[str, str] | None = None

    def frames(self, id: int, timeout_ms: int | None) -> list[bytes]:
        """The two frames of this CALL sent with ``id`` and ``timeout_ms``."""
        return [pack([VERSION, CALL, id, self.service, self.method, timeout_ms, self.traceparent,
                      self.meta or None]), self.body]


@dataclass(slots=True)
class PushMessage:
    """A PUSH as its publisher holds it: the payload encoded once for every subscriber."""

    topic: str
    body: bytes
    traceparent: str | None = None
    meta: Mapping[str, str] | None = None

    def frames(self, id: int, timeout_ms: int | None) -> list[bytes]:
        """The two frames of this PUSH sent with ``id`` and ``timeout_ms``."""
        return [pack([VERSION, PUSH, id, "", self.topic, timeout_ms, self.traceparent, self.meta or None]),
                self.body]


def encode_call_body(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    """A CALL body, ``[args, kwargs]`` (raises ``TypeError`` for non-MessagePack values)."""
    return pack([list(args), dict(kwargs)])


def encode_call(
    id: int, service: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any],
    timeout_ms: int | None, traceparent: str | None, meta: Mapping[str, str] | None,
) -> list[bytes]:
    """Frames of a CALL: what :class:`CallMessage` sends."""
    return CallMessage(service, method, encode_call_body(args, kwargs), traceparent, meta).frames(id, timeout_ms)


def encode_push_body(payload: Any) -> bytes:
    """Encode a PUSH body once, to send it to many subscribers."""
    return pack(payload)


def encode_push(
    id: int, topic: str, payload: Any, timeout_ms: int | None, traceparent: str | None,
    meta: Mapping[str, str] | None,
) -> list[bytes]:
    """Frames of a PUSH: what :class:`PushMessage` sends."""
    return PushMessage(topic, encode_push_body(payload), traceparent, meta).frames(id, timeout_ms)


def encode_reply(id: int, result: Any) -> list[bytes]:
    """Frames of a REPLY (raises ``TypeError`` if ``result`` is not MessagePack-able)."""
    return [pack([VERSION, REPLY, id]), pack(result)]


def encode_error(
    id: int, code: str, message: str, type: str = "", traceback: str | None = None
) -> list[bytes]:
    """Frames of an ERROR (``unsupported_version`` also lists the versions spoken)."""
    body: dict[str, Any] = {"code": str(code), "message": message}
    if type:
        body["type"] = type
    if traceback:
        body["traceback"] = traceback
    if code == ErrorCode.UNSUPPORTED_VERSION:
        body["supported"] = list(SUPPORTED_VERSIONS)
    return [pack([VERSION, ERROR, id]), pack(body)]


def encode_ack(id: int) -> list[bytes]:
    """Frames of an ACK."""
    return [pack([VERSION, ACK, id]), _NIL]


def encode_ping(id: int) -> list[bytes]:
    """Frames of a PING."""
    return [pack([VERSION, PING, id]), _NIL]


def encode_cancel(id: int, reason: str | None = None) -> list[bytes]:
    """Frames of a CANCEL of the CALL ``id``, saying why (``reason``) or not (nil)."""
    return [pack([VERSION, CANCEL, id]), _NIL if reason is None else pack(reason)]


def decode_cancel_reason(frame: bytes) -> str:
    """Why a CANCEL was sent: one of the known reasons, :data:`CANCELLED` for nil or anything else."""
    if len(frame) > 16:  # no known reason is longer: not worth decoding
        return CANCELLED
    try:
        reason = unpack(frame)
    except ProtocolError:
        return CANCELLED
    return reason if reason in _CANCEL_REASONS else CANCELLED


def encode_pong(id: int, state: str, inflight: int) -> list[bytes]:
    """Frames of a PONG."""
    return [pack([VERSION, PONG, id]), pack([str(state), inflight])]


def decode_header(
    frame: bytes, *, max_size: int = MAX_HEADER_SIZE, max_name: int = MAX_NAME_LENGTH
) -> Header:
    """Decode and validate a header frame.

    Raises only :class:`ProtocolError`: ``bad_request`` for anything malformed
    (a frame over ``max_size`` bytes, a name over ``max_name`` characters
    included), ``unsupported_version`` for a version other than 1, with a
    short message and ``exc.id`` the request id when readable
    (:func:`peek_id`), else 0.
    """
    if len(frame) > max_size:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"header of {len(frame)} bytes exceeds the limit of {max_size}",
                            peek_id(frame))
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # several unrelated types, StackError for deep nesting
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"header is not valid MessagePack: {why(exc)}",
                            peek_id(frame)) from None
    if not isinstance(raw, list) or len(raw) < 3:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "header must be an array of at least 3 items")
    version, kind, id = raw[0], raw[1], raw[2]
    if type(id) is not int or not 0 <= id <= _MAX_ID:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "header id must be an unsigned 64-bit integer")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
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


def split_request(
    frames: list[bytes], *, max_size: int = MAX_HEADER_SIZE, max_name: int = MAX_NAME_LENGTH
) -> Header:
    """Check the frame count of a message a server received (no identity frame) and decode its header.

    Raises :class:`ProtocolError` as :func:`decode_header` does, and
    ``bad_request`` for any count but two (with the first frame's id if
    readable, else 0). The body is left to the caller, to decode once admitted.
    """
    if len(frames) != 2:
        id = 0
        if frames:
            try:
                id = decode_header(frames[0], max_size=max_size, max_name=max_name).id
            except ProtocolError as exc:
                id = exc.id
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected 2 frames, got {len(frames)}", id)
    return decode_header(frames[0], max_size=max_size, max_name=max_name)


def pack_batches(messages: list[list[bytes]], routing: int = 0) -> list[list[bytes]]:
    """Join messages for one destination into batches within the bounds, in order.

    Each message is ``routing`` frames (a ROUTER's identity: the same in
    every message) then one ``[header, body]`` pair. Consecutive pairs are
    joined while a batch holds under :data:`MAX_BATCH_PAIRS` pairs and
    :data:`MAX_BATCH_BYTES` bytes; a message left alone is returned as it was
    (so a pair of ``MAX_BATCH_BYTES`` or more always goes alone).
    """
    out: list[list[bytes]] = []
    batch: list[bytes] = []
    pairs = size = 0
    for message in messages:
        n = len(message[routing]) + len(message[routing + 1])
        if pairs and (pairs >= MAX_BATCH_PAIRS or size + n > MAX_BATCH_BYTES):
            out.append(batch)
            pairs = 0
        if pairs == 0:
            batch, pairs, size = message, 1, n
        else:
            if pairs == 1:
                batch = list(batch)  # the first message's list is the caller's: not extended in place
            batch.append(message[routing])
            batch.append(message[routing + 1])
            pairs += 1
            size += n
    if pairs:
        out.append(batch)
    return out


def pairs_of(frames: list[bytes]) -> list[list[bytes]]:
    """The ``[header, body]`` pairs of a message of an even number of frames (a batch, or one pair)."""
    return [frames[i:i + 2] for i in range(0, len(frames), 2)]


@dataclass(slots=True)
class Answer:
    """A decoded answer: ``value`` of a REPLY or PONG; ``error`` of an ERROR or of an unreadable body."""

    id: int
    kind: int
    value: Any = None
    error: ErrorBody | None = None


def decode_answer(frames: list[bytes]) -> Answer:
    """Decode an answer (REPLY, ERROR, ACK, PONG) a client received.

    Raises :class:`ProtocolError` when no request can be matched (not two
    frames, an unreadable header, not an answer kind). An unreadable body
    becomes a ``bad_request`` :attr:`Answer.error`: its request fails at once.
    """
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected 2 frames, got {len(frames)}")
    header = decode_header(frames[0])
    kind = header.kind
    if kind not in _ANSWERS_TO_CLIENTS:
        raise _bad(header.id, f"a client is not sent a {KIND_NAMES[kind]}")
    try:
        if kind == REPLY or kind == PONG or kind == ITEM:
            return Answer(header.id, kind, unpack(frames[1]))
        if kind == ERROR:
            return Answer(header.id, kind, None, decode_error_body(frames[1]))
        return Answer(header.id, kind)
    except ProtocolError as exc:
        return Answer(header.id, ERROR, None,
                      ErrorBody(ErrorCode.BAD_REQUEST, f"malformed {KIND_NAMES[kind]} body: {exc}"))


def decode_call_body(frame: bytes, id: int) -> tuple[list[Any], dict[str, Any]]:
    """Decode a CALL body into ``(args, kwargs)``; ``bad_request`` if malformed."""
    return decode_call(frame, id)[:2]


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
        return ErrorBody(ErrorCode.BAD_REQUEST, f"malformed ERROR body: {clip(body)}")
    code = body.get("code")
    message = body.get("message")
    etype = body.get("type")
    tb = body.get("traceback")
    # Bounded here, once: the fields become exception text that callers log and
    # pass on (a gateway shows them to its clients).
    return ErrorBody(
        _bounded(code, MAX_ERROR_CODE) if isinstance(code, str) else LocalCode.REMOTE_ERROR,
        _bounded(message, MAX_ERROR_MESSAGE) if isinstance(message, str) else "",
        _bounded(etype, MAX_ERROR_TYPE) if isinstance(etype, str) else "",
        _bounded(tb, MAX_ERROR_TRACEBACK) if isinstance(tb, str) else None,
    )


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else clip(text, limit)


def _bad(id: int, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, id)
