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

Each publisher→subscriber stream is numbered (:mod:`meshkit.sequence`), so a
subscriber can tell that it missed a push. The guarantee is **at most once**
per subscriber: a push is never sent twice, and an ACK means the handlers
ran; a push lost with its connection, refused, or past its deadline is not
resent. A subscriber that needs every message must get them from a source it
can re-read (a Redis stream, a database) and treat a gap as its cue to catch up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from . import wire
from .codes import ErrorCode
from .errors import CallTimeoutError, LostPeerError, MessageTooLargeError, error_from_wire
from .exchange import DeadlinePassed, LostInFlight, NotDelivered
from .peer import FAILED
from .pool import PeerPool
from .record import InstanceRecord
from .sequence import PushStreams
from .untrusted import clip

log = logging.getLogger("meshkit.publish")

# The numbered streams of this process's pushes, one per peer (kept as long as the peer).
STREAMS = PushStreams()


async def publish(
    pool: PeerPool,
    topic: str,
    payload: Any,
    deadline: float,
    traceparent: str,
    meta: Mapping[str, str] | None,
) -> tuple[int, int]:
    """Push ``payload`` to every subscriber of ``topic``; wait for ACKs until ``deadline`` (pool's clock).

    Returns ``(subscribers, delivered)``. Raises :class:`MessageTooLargeError`
    if the payload exceeds this process's own limit; a subscriber whose limit
    is smaller is skipped (and logged), never disconnected.
    """
    message = wire.PushMessage(topic, wire.encode_push_body(payload), traceparent, meta)
    size = len(message.body)
    if size > pool.settings.max_message_size:
        raise MessageTooLargeError(f"payload of {size} bytes exceeds max_message_size {pool.settings.max_message_size}")
    subscribers = pool.registry.subscribers(topic)
    waits: list[asyncio.Future[wire.Answer]] = []
    for record in subscribers:
        peer = pool.peer_for(record)
        if peer is None or peer.state == FAILED:
            continue
        stamped = STREAMS.stamp(peer, message)  # a number used up, sent or not: the subscriber missed it
        if record.max_message_size and size > record.max_message_size:
            log.warning("not pushing %s to %s: %d bytes exceed its limit of %d",
                        clip(topic), record.key, size, record.max_message_size)
            continue
        try:
            waits.append(pool.exchange.start(peer, stamped, deadline))
        except (NotDelivered, DeadlinePassed):
            continue
    # Every wait settles by the deadline at the latest (the exchange's timers).
    answers = await asyncio.gather(*waits, return_exceptions=True)
    delivered = sum(1 for a in answers if isinstance(a, wire.Answer) and a.kind == wire.ACK)
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
    flight (it may or may not have run) or could not be made,
    :class:`MessageTooLargeError` for an oversized payload.
    """
    message = wire.PushMessage(topic, wire.encode_push_body(payload), traceparent, meta)
    limit = min(pool.settings.max_message_size, record.max_message_size or pool.settings.max_message_size)
    if len(message.body) > limit:
        raise MessageTooLargeError(f"payload of {len(message.body)} bytes exceeds max_message_size {limit}")
    peer = pool.peer_for(record)
    if peer is None or peer.state == FAILED:
        raise LostPeerError(f"instance {record.key} is not reachable")
    try:
        answer = await pool.exchange.start(peer, STREAMS.stamp(peer, message), deadline)
    except NotDelivered:
        raise LostPeerError(f"instance {record.key} is not reachable") from None
    except LostInFlight:
        raise LostPeerError(f"instance {record.key} was lost with a push in flight") from None
    except DeadlinePassed:
        raise CallTimeoutError(f"push to {record.key} got no answer within its deadline") from None
    if answer.kind == wire.ACK:
        return
    err = answer.error or wire.ErrorBody(ErrorCode.BAD_REQUEST, f"a PUSH answered by {wire.KIND_NAMES[answer.kind]}")
    raise error_from_wire(err.code, err.message, service=record.service, method=topic,
                          remote_type=err.type, remote_traceback=err.traceback)
