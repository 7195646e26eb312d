"""Push-publish: one PUSH to every subscribed instance, through its own router.

There is no broker. The publisher encodes the payload once, sends a PUSH to
each instance whose record lists a matching topic, and counts the ACKs that
arrive before its deadline. Order is kept per publisher→subscriber pair: one
connection per pair, and the subscriber handles one sender's pushes one after
another. A slow or dead subscriber delays the publisher by at most the
deadline; a live one still gets the message later, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import wire
from .errors import MessageTooLargeError
from .peer import FAILED, Pending
from .pool import PeerPool
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
