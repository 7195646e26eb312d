"""Stratum v1 messages as miners parse them: JSON-RPC 1.0 style, one JSON object per line.

Requests carry ``id``, ``method`` and ``params``; answers carry ``id``,
``result`` and ``error``, **both always present**: ``"error": null`` on
success, and on failure ``"result": null`` with ``error`` an array
``[code, message, traceback]`` (traceback always ``null``). Notifications
from the pool have ``"id": null``. This is what cgminer, bfgminer and
cpuminer expect; a JSON-RPC 2.0 error object would be misread by them.

Client to pool
    ``mining.subscribe [user_agent?, session?]`` →
    ``[[["mining.set_difficulty", sub_id], ["mining.notify", sub_id]], extranonce1_hex, extranonce2_size]``;
    ``mining.authorize [worker, password]`` → ``true`` (or error 24);
    ``mining.extranonce.subscribe []`` → ``true`` (the pool may then send
    ``mining.set_extranonce``);
    ``mining.submit [worker, job_id, extranonce2, ntime, nonce]`` →
    ``true`` or a verdict's error (see :mod:`.shares`).

Pool to client (notifications)
    ``mining.set_difficulty [difficulty]``;
    ``mining.notify [job_id, prevhash, coinb1, coinb2, merkle_branch, version, nbits, ntime, clean_jobs]``
    (see :mod:`.work` for byte orders);
    ``mining.set_extranonce [extranonce1_hex, extranonce2_size]``;
    ``client.reconnect [host, port, wait_seconds]``.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from meshkit.untrusted import clip

from .shares import ShareResult
from .work import Job

MAX_LINE = 16 * 1024  # bytes of one Stratum line; the longest real one (a notify) is well under 4 KiB


class Method(str, enum.Enum):
    """Every method name the pool and the miner speak."""

    SUBSCRIBE = "mining.subscribe"
    AUTHORIZE = "mining.authorize"
    SUBMIT = "mining.submit"
    EXTRANONCE_SUBSCRIBE = "mining.extranonce.subscribe"
    SET_DIFFICULTY = "mining.set_difficulty"
    NOTIFY = "mining.notify"
    SET_EXTRANONCE = "mining.set_extranonce"
    RECONNECT = "client.reconnect"


def request(id: int, method: Method, params: list[Any]) -> dict[str, Any]:
    """A client request."""
    return {"id": id, "method": method.value, "params": params}


def notification(method: Method, params: list[Any]) -> dict[str, Any]:
    """A pool-to-client message: ``id`` null."""
    return {"id": None, "method": method.value, "params": params}


def result(id: Any, value: Any) -> dict[str, Any]:
    """A successful answer: ``error`` null."""
    return {"id": id, "result": value, "error": None}


def error(id: Any, code: int, message: str) -> dict[str, Any]:
    """A failed answer: ``result`` null, ``error`` ``[code, message, null]``."""
    return {"id": id, "result": None, "error": [code, message, None]}


def share_answer(id: Any, share: ShareResult) -> dict[str, Any]:
    """The answer to a ``mining.submit``: ``true``, or the verdict's error array."""
    err = share.error()
    return result(id, True) if err is None else {"id": id, "result": None, "error": err}


def subscribe_result(subscription_id: str, extranonce1: bytes, extranonce2_size: int) -> list[Any]:
    """The ``result`` of ``mining.subscribe``."""
    subscriptions = [[Method.SET_DIFFICULTY.value, subscription_id], [Method.NOTIFY.value, subscription_id]]
    return [subscriptions, extranonce1.hex(), extranonce2_size]


def notify(job: Job) -> dict[str, Any]:
    """``mining.notify`` for ``job``."""
    return notification(Method.NOTIFY, job.notify_params())


def set_difficulty(difficulty: float) -> dict[str, Any]:
    """``mining.set_difficulty``; an integral difficulty is sent as an integer, as pools do."""
    value: float | int = int(difficulty) if float(difficulty).is_integer() else difficulty
    return notification(Method.SET_DIFFICULTY, [value])


def set_extranonce(extranonce1: bytes, extranonce2_size: int) -> dict[str, Any]:
    """``mining.set_extranonce`` (for clients that sent ``mining.extranonce.subscribe``)."""
    return notification(Method.SET_EXTRANONCE, [extranonce1.hex(), extranonce2_size])


def reconnect(host: str, port: int, wait: int = 0) -> dict[str, Any]:
    """``client.reconnect``: the client should reconnect to ``host:port`` after ``wait`` seconds."""
    return notification(Method.RECONNECT, [host, port, wait])


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line: compact JSON and ``\\n``."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One received line as a message object; ``ValueError`` saying why it is not one.

    A line longer than :data:`MAX_LINE` is refused before it is parsed.
    """
    if len(line) > MAX_LINE:
        raise ValueError(f"line of {len(line)} bytes is over the {MAX_LINE}-byte limit")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {clip(line, 60)} ({clip(str(exc), 60)})") from None
    if not isinstance(message, dict):
        raise ValueError(f"not a JSON object: {clip(line, 60)}")
    return message
