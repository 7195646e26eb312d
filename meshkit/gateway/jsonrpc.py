"""JSON-RPC 2.0 over newline-delimited JSON: what a gateway client speaks.

One UTF-8 JSON text per line (``\\n``; a trailing ``\\r`` is ignored, blank
lines are skipped). The line is decoded as UTF-8 strictly: other encodings
(UTF-16 and UTF-32, which JSON parsers often detect, or a byte-order mark)
are a ``parse_error``. A line holds one request object or a batch (an array
of at most ``max_batch`` of them, 64 by default). A request is::

    {"jsonrpc": "2.0", "method": "SERVICE.METHOD", "params": [...] | {...}, "id": 1}

(``"jsonrpc"`` may be absent, as Stratum v1 clients send it; any other value is invalid.)

Two optional members tie a request to a trace (``docs/observability.md``):
``"traceparent"``, a W3C trace context (``00-<32 hex>-<16 hex>-<2 hex>``;
anything else is ignored), makes the request's spans part of that trace;
with it, or with ``"trace": true``, an error answer's ``data`` carries
``"trace_id"``, the id ``meshkit trace`` takes.

``params`` is optional; an array becomes positional arguments, an object
keyword arguments. ``id`` is a string, a finite number or null (a number
too large for a double, like ``1e400``, is an invalid request: no answer
could carry it back). Without ``id`` the request is a notification: it runs but
gets no answer. Answers are ``{"jsonrpc": "2.0", "id": ..., "result": ...}``
or ``{"jsonrpc": "2.0", "id": ..., "error": {"code", "message", "data"}}``,
in completion order, not request order (match them by ``id``). Pushed
messages are notifications whose ``method`` is the topic.

A batch is answered with one array of the answers of its requests
(notifications left out), at most ``limit`` bytes long (the gateway's
``max_output``): should the answers not fit, the largest results are
replaced by an ``internal_error`` (``data.code`` ``too_large``) with their
``id``, until the array fits. The request ran; asked alone, its answer is
sent whatever its size. A batch of more than ``max_batch`` items is not run
at all: it is answered with one ``batch_too_large`` error object.

Texts that come from the client (a method name, ...) are clipped to a few
hundred characters where an error message quotes them, so an answer is never
much larger than the request line that caused it (``id`` is echoed whole, as
the protocol demands; it came in the same line).

Error codes
-----------
Every error answer's ``code`` and ``data.code`` is one of the table in
:mod:`meshkit.gateway.rpcerrors` (which defines them; they are importable
from here as well).

Listeners with the ``stratum`` dialect write the same answers in Stratum's
JSON-RPC 1.0 shape (:mod:`meshkit.gateway.dialect`).

Built-in methods (answered by the gateway itself, no mesh call):
``mesh.hello``, ``mesh.subscribe``, ``mesh.unsubscribe`` (see
``docs/gateway.md``) and ``mesh.ping``, whose result is ``"pong"``: HAProxy's
health check sends ``{"jsonrpc":"2.0","id":"haproxy-check","method":"mesh.ping"}``
and expects ``"id":"haproxy-check","result":"pong"`` in the answer, which
only a gateway whose event loop runs can give.

This module only parses and formats; it does no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..untrusted import clip
from .rpcerrors import (
    ADDRESS_LIMITED,
    BANNED,
    BATCH_TOO_LARGE,
    HANDLER_ERROR,
    IDLE_TIMEOUT,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LINE_TOO_LONG,
    LOST_PEER,
    METHOD_NOT_FOUND,
    NO_INSTANCE,
    PARSE_ERROR,
    RATE_LIMITED,
    REASONS,
    RESOURCE_EXHAUSTED,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_IN_FLIGHT,
    RpcError,
    error_for,
)

# The error codes and RpcError live in meshkit.gateway.rpcerrors; they are part of this protocol, so they are here too.
__all__ = [
    "ADDRESS_LIMITED",
    "BANNED",
    "BATCH_TOO_LARGE",
    "HANDLER_ERROR",
    "IDLE_TIMEOUT",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LINE_TOO_LONG",
    "LOST_PEER",
    "MAX_BATCH",
    "METHOD_NOT_FOUND",
    "NO_INSTANCE",
    "PARSE_ERROR",
    "RATE_LIMITED",
    "REASONS",
    "RESOURCE_EXHAUSTED",
    "SHUTTING_DOWN",
    "SLOW_CONSUMER",
    "TIMEOUT",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_IN_FLIGHT",
    "UNENCODABLE",
    "ErrorDoc",
    "Invalid",
    "Item",
    "Line",
    "Request",
    "RequestId",
    "RpcError",
    "answer_line",
    "encode_line",
    "error_doc",
    "error_for",
    "error_line",
    "error_object",
    "notification_line",
    "parse_line",
    "parse_request",
    "result_doc",
    "split_method",
]

#: Items a batch may hold by default (``max_batch``).
MAX_BATCH = 64
RequestId = str | int | float | None
#: Makes an error answer object: ``(id, code, message, data) -> dict``.
ErrorDoc = Callable[[RequestId, int, str, "Mapping[str, Any] | None"], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request. ``notification`` is True when it carried no ``id``."""

    id: RequestId
    method: str
    params: list[Any] | dict[str, Any] | None
    notification: bool = False
    traceparent: str | None = field(default=None, compare=False)  # the client's W3C trace context, if sent
    want_trace: bool = field(default=False, compare=False)  # "trace": true, or a traceparent: errors name the trace


@dataclass(frozen=True, slots=True)
class Invalid:
    """A batch item (or the whole line) that is not a valid request: answer with this error."""

    id: RequestId
    code: int
    message: str
    data: Mapping[str, Any] | None = None


Item = Request | Invalid


@dataclass(frozen=True, slots=True)
class Line:
    """What one line held: its items, and whether they came as a batch (an array)."""

    items: list[Item]
    batch: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every line: json.loads with an option builds a new JSONDecoder per call
# (2.6% of a gateway's CPU per request under pipelined load).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_line(line: bytes, max_batch: int = MAX_BATCH) -> Line | None:
    """Parse one line (without its ``\\n``); ``None`` for a blank line.

    Never raises: what cannot be parsed becomes an :class:`Invalid` item. A
    batch of more than ``max_batch`` items becomes one :class:`Invalid`
    (``batch_too_large``) without looking at its items.
    """
    raw = line.rstrip(b"\r")
    if not raw.strip():
        return None
    try:
        # Strictly UTF-8: json.loads on bytes would guess UTF-16 or UTF-32.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Line([Invalid(None, PARSE_ERROR, f"the line is not UTF-8 text (byte "
                                                f"0x{raw[exc.start]:02x} at position {exc.start})")])
    if "\x00" in text:
        # Valid UTF-8, never valid JSON: the usual sign of UTF-16 or UTF-32.
        return Line([Invalid(None, PARSE_ERROR, "the line holds NUL bytes; it must be UTF-8 text "
                                                "(not UTF-16 or UTF-32)")])
    try:
        if text.startswith("\ufeff"):  # what json.loads says of a BOM (the decoder itself does not check)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        doc = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        # RecursionError is deep nesting; a BOM is a ValueError that names UTF-8.
        return Line([Invalid(None, PARSE_ERROR, f"invalid JSON: {clip(str(exc), 200)}")])
    if isinstance(doc, list):
        if not doc:
            return Line([Invalid(None, INVALID_REQUEST, "empty batch")])
        if len(doc) > max_batch:
            return Line([Invalid(None, BATCH_TOO_LARGE,
                                 f"a batch of {len(doc)} items; at most {max_batch} are allowed "
                                 "(none was run)", {"max_batch": max_batch})])
        return Line([parse_request(item) for item in doc], batch=True)
    return Line([parse_request(doc)])


def parse_request(doc: Any) -> Item:
    """Validate one decoded JSON value as a JSON-RPC 2.0 request."""
    if not isinstance(doc, dict):
        return Invalid(None, INVALID_REQUEST, "a request must be a JSON object")
    has_id = "id" in doc
    rid = doc.get("id")
    if has_id and not _valid_id(rid):
        return Invalid(None, INVALID_REQUEST, "id must be a string, a finite number or null")
    # Stratum v1 clients send JSON-RPC 1.0-style objects without "jsonrpc";
    # they are the first users, so a missing member is accepted. A wrong one is not.
    if "jsonrpc" in doc and doc["jsonrpc"] != "2.0":
        return Invalid(rid, INVALID_REQUEST, 'jsonrpc must be "2.0" (or absent)')
    method = doc.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(rid, INVALID_REQUEST, "method must be a non-empty string")
    params = doc.get("params")
    if "params" in doc and not isinstance(params, (list, dict)):
        return Invalid(rid, INVALID_REQUEST, "params must be an array or an object")
    traceparent = doc.get("traceparent")  # an extension member: the trace this request belongs to
    traceparent = traceparent if isinstance(traceparent, str) and len(traceparent) == 55 else None
    return Request(rid, method, params, notification=not has_id, traceparent=traceparent,
                   want_trace=traceparent is not None or doc.get("trace") is True)


def _valid_id(value: Any) -> bool:
    # bool is an int in Python but not a JSON-RPC id. A number too large for a
    # double (1e400) parses as infinity, which no answer could carry back.
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or (isinstance(value, (str, int)) and not isinstance(value, bool))


def split_method(method: str) -> tuple[str, str] | None:
    """``"SERVICE.METHOD"`` as ``(service, method)``; ``None`` if it has no such shape."""
    service, dot, name = method.partition(".")
    if not dot or not service or not name:
        return None
    return service, name


def _json_default(value: Any) -> Any:
    # Mesh replies are MessagePack, which has types JSON lacks.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# What json.dumps raises for a value JSON cannot hold: NaN or infinity
# (ValueError), a reference cycle (ValueError), nesting too deep (RecursionError).
UNENCODABLE = (TypeError, ValueError, RecursionError)


# One encoder for every line: json.dumps with options builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default, allow_nan=False)


def _encode(value: Any) -> bytes:
    """``value`` as compact JSON text, without a newline; raises one of :data:`UNENCODABLE`."""
    return _ENCODER.encode(value).encode()


def _dump(doc: dict[str, Any]) -> bytes:
    return _encode(doc) + b"\n"


def error_object(code: int, message: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``error`` member; ``data.code`` defaults to the code's stable string."""
    full = {"code": REASONS.get(code, "error")}
    full.update(data or {})
    return {"code": code, "message": message, "data": full}


def error_line(rid: RequestId, code: int, message: str,
               data: Mapping[str, Any] | None = None) -> bytes:
    """An error response, newline included."""
    return _dump({"jsonrpc": "2.0", "id": rid, "error": error_object(code, message, data)})


def result_doc(rid: RequestId, result: Any) -> dict[str, Any]:
    """A success response as an object (for batches)."""
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def error_doc(rid: RequestId, code: int, message: str,
              data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An error response as an object (for batches)."""
    return {"jsonrpc": "2.0", "id": rid, "error": error_object(code, message, data)}


def answer_line(docs: Sequence[dict[str, Any]], batch: bool,
                limit: int | None = None,
                make_error: ErrorDoc | None = None) -> tuple[bytes, list[str]]:
    """The line answering one request line, newline included, and what went wrong encoding it.

    ``docs`` are the response objects (at least one); with ``batch`` they go
    out as an array, else ``docs[0]`` alone. Each is encoded on its own, so
    one that JSON cannot hold (a NaN in a result, ...) spoils only itself: it
    becomes an ``internal_error`` with the same ``id`` (``id`` null should the
    id be what cannot be encoded). With ``limit``, a batch's array is cut to
    at most ``limit`` bytes by replacing its largest answers with a
    ``too_large`` error (see the module doc); it can only stay longer if the
    replacements alone do not fit. The list describes each replacement, for
    the log; it is empty when all went well. ``make_error`` makes the
    replacements (default: this module's JSON-RPC 2.0 :func:`error_doc`; a
    listener's dialect passes its own).
    """
    make = make_error or error_doc
    problems: list[str] = []
    parts = [_encode_answer(doc, problems, make) for doc in (docs if batch else docs[:1])]
    if not batch:
        return parts[0] + b"\n", problems
    if limit is not None:
        _fit(parts, docs, limit, problems, make)
    return b"[" + b",".join(parts) + b"]\n", problems


def _fit(parts: list[bytes], docs: Sequence[dict[str, Any]], limit: int, problems: list[str],
         make: ErrorDoc) -> None:
    """Replace the largest of ``parts`` with short errors until the array fits ``limit`` bytes."""
    size = sum(len(p) for p in parts) + len(parts) + 2  # commas, brackets and the newline
    for i in sorted(range(len(parts)), key=lambda i: len(parts[i]), reverse=True):
        if size <= limit:
            return
        cut = _encode_answer(make(docs[i].get("id"), INTERNAL_ERROR,
                                       f"the batch's answer would exceed {limit} bytes; this "
                                       f"answer ({len(parts[i])} bytes) was left out: ask for "
                                       "it alone", {"code": "too_large", "limit": limit}), problems, make)
        if len(cut) >= len(parts[i]):
            continue
        problems.append(f"answer to id {clip(docs[i].get('id'))} left out of a batch: "
                        f"{len(parts[i])} bytes, over the {limit}-byte limit")
        size -= len(parts[i]) - len(cut)
        parts[i] = cut


def _encode_answer(doc: dict[str, Any], problems: list[str], make: ErrorDoc) -> bytes:
    try:
        return _encode(doc)
    except UNENCODABLE as exc:
        problems.append(f"answer to id {clip(doc.get('id'))} cannot be encoded as JSON: "
                        f"{clip(str(exc))}")
    fallback = make(doc.get("id"), INTERNAL_ERROR, "the answer cannot be encoded as JSON", None)
    try:
        return _encode(fallback)
    except UNENCODABLE:
        # The id itself cannot be encoded (parse_request lets no such id through).
        return _encode({**fallback, "id": None})


def encode_line(doc: dict[str, Any]) -> bytes:
    """``doc`` as one line, newline included; raises one of :data:`UNENCODABLE`."""
    return _dump(doc)


def notification_line(method: str, params: Any) -> bytes:
    """A server-to-client notification (a pushed message), newline included.

    Raises one of :data:`UNENCODABLE` if ``params`` cannot be sent as JSON.
    """
    return _dump({"jsonrpc": "2.0", "method": method, "params": params})
