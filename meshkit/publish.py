"""Push-publish: one PUSH to every subscribed instance, through its own router.

There is no broker. The publisher encodes the payload once, sends a PUSH to
each instance whose record lists a matching topic, and counts the ACKs that
arrive before its deadline. Order is kept per publisher→subscriber pair: one
connection per pair, and the subscriber handles one sender's pushes one after
another. A slow or dead subscriber delays the publisher by at most the
deadline; a live one still gets the message later, in order.

:func:`push_one` sends one PUSH to one chosen instance (a gateway, to reach
one of its client connections) and reports that instance's answer. It goes
through the same connection as :func:`publish`'s pushes to that instance, so
the two keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import wire
from .errors import CallTimeoutError, LostPeerError, MessageTooLargeError, ProtocolError, error_from_wire
from .peer import FAILED, Pending
from .pool import PeerPool
from .record import InstanceRecord
from .untrusted import clip

log = logging.getLogger("meshkit.publish")


async def publish(
    pool: PeerPool,
    topic: str,
    payload: Any,
    deadline: float,
    traceparent: str,
    meta: Mapping[str, str] | None,
) -> tuple[int, int]:
    """Push ``payload`` to every subscriber of ``topic``; wait for ACKs until ``deadline`` (monotonic).

    Returns ``(subscribers, delivered)``. Raises :class:`MessageTooLargeError`
    if the payload exceeds this process's own limit; a subscriber whose limit
    is smaller is skipped (and logged), never disconnected.
    """
    body = wire.encode_push_body(payload)
    if len(body) > pool.settings.max_message_size:
        raise MessageTooLargeError(
            f"payload of {len(body)} bytes exceeds max_message_size {pool.settings.max_message_size}")
    loop = asyncio.get_running_loop()
    timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
    subscribers = pool.registry.subscribers(topic)
    waits: dict[asyncio.Future[bool], tuple[Any, int]] = {}
    for record in subscribers:
        peer = pool.peer_for(record)
        if peer is None or peer.state == FAILED:
            continue
        if record.max_message_size and len(body) > record.max_message_size:
            log.warning("not pushing %s to %s: %d bytes exceed its limit of %d",
                        clip(topic), record.key, len(body), record.max_message_size)
            continue
        request_id = pool.next_id()
        header = wire.encode_push_header(request_id, topic, timeout_ms, traceparent, meta)
        if not peer.send([header, body]):
            continue
        future: asyncio.Future[bool] = loop.create_future()
        peer.pending[request_id] = Pending(_on_ack(future), _on_fail(future))
        waits[future] = (peer, request_id)
    delivered = 0
    if waits:
        done, not_done = await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()))
        delivered = sum(1 for f in done if not f.cancelled() and f.result())
        for future in not_done:
            # Forget it, or the subscriber's load would count it for ever.
            peer, request_id = waits[future]
            peer.pending.pop(request_id, None)
            future.cancel()
    return len(subscribers), delivered


async def push_one(
    pool: PeerPool,
    record: InstanceRecord,
    topic: str,
    payload: Any,
    deadline: float,
    traceparent: str,
    meta: Mapping[str, str] | None,
) -> None:
    """Push ``payload`` on ``topic`` to the instance of ``record`` alone; return once it acknowledged.

    Raises the instance's error (a :class:`~meshkit.errors.RemoteError`:
    :class:`~meshkit.errors.UnknownConnectionError` when a gateway has no
    such connection, ``unknown_method`` when it has no handler for the topic),
    :class:`CallTimeoutError` with no answer by ``deadline``,
    :class:`LostPeerError` when the connection to it failed with the push in
    flight (it may or may not have run), :class:`MessageTooLargeError` for an
    oversized payload.
    """
    body = wire.encode_push_body(payload)
    limit = min(pool.settings.max_message_size, record.max_message_size or pool.settings.max_message_size)
    if len(body) > limit:
        raise MessageTooLargeError(f"payload of {len(body)} bytes exceeds max_message_size {limit}")
    peer = pool.peer_for(record)
    if peer is None or peer.state == FAILED:
        raise LostPeerError(f"instance {record.key} is not reachable")
    future: asyncio.Future[tuple[int, bytes] | None] = asyncio.get_running_loop().create_future()

    def on_answer(kind: int, frame: bytes) -> None:
        if not future.done():
            future.set_result((kind, frame))

    def on_fail(lost: bool) -> None:
        if not future.done():
            future.set_result(None)

    request_id = pool.next_id()
    timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
    header = wire.encode_push_header(request_id, topic, timeout_ms, traceparent, meta)
    if not peer.send([header, body]):
        raise LostPeerError(f"instance {record.key} is not reachable")
    peer.pending[request_id] = Pending(on_answer, on_fail)
    try:
        answer = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise CallTimeoutError(f"push to {record.key} got no answer within its deadline") from None
    finally:
        peer.pending.pop(request_id, None)
    if answer is None:
        raise LostPeerError(f"instance {record.key} was lost with a push in flight")
    kind, frame = answer
    if kind == wire.ACK:
        return
    try:
        err = wire.decode_error_body(frame)
    except ProtocolError as exc:
        raise error_from_wire("bad_request", str(exc)) from None
    raise error_from_wire(err.code, err.message, service=record.service, method=topic,
                          remote_type=err.type, remote_traceback=err.traceback)


def _on_ack(future: asyncio.Future[bool]) -> Callable[[int, bytes], None]:
    def on_answer(kind: int, frame: bytes) -> None:
        if not future.done():
            future.set_result(kind == wire.ACK)
    return on_answer


def _on_fail(future: asyncio.Future[bool]) -> Callable[[bool], None]:
    def on_fail(lost: bool) -> None:
        if not future.done():
            future.set_result(False)
    return on_fail
