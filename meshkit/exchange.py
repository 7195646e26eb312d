"""Request correlation: ids, what is in flight on each peer, deadlines, answers.

One :class:`Exchange` serves one client (it belongs to the client's
:class:`~meshkit.pool.PeerPool`). It is the only place that knows a request
id. :meth:`Exchange.start` gives the request an id, sends its frames to the
peer, enters it in that peer's table and starts its deadline timer; every
request started is then **settled exactly once**, here, by the first of:

* its answer (:meth:`Exchange.receive`): the :class:`~meshkit.wire.Answer`
  (a REPLY, an ACK, a PONG, or an ERROR the caller must see);
* an answer that says it did not run: ``draining`` (the peer is marked
  draining) or ``unknown_service`` (the endpoint now serves another
  service: the peer is retired) — :class:`NotDelivered`;
* the peer failing first (:meth:`Exchange.abandon`): :class:`LostInFlight`
  if the peer was connected (the request may have run), else
  :class:`NotDelivered` (it never reached the instance);
* its deadline: :class:`DeadlinePassed`.

Settling removes the entry and cancels the timer; an answer that arrives
later (or matches nothing, or comes from another peer than the one asked)
is dropped and counted in :attr:`Exchange.dropped`, as is an answer that
cannot be read. A request that could not be sent at all raises
:class:`NotDelivered` from :meth:`~Exchange.start` itself.

When the caller stops waiting, the instance is told with a CANCEL, if its
record lists the ``cancel`` feature (``docs/protocol.md`` §4): the waiter
being cancelled (its task, or ``asyncio.wait_for``) calls
:meth:`~Exchange.withdraw`, which settles the entry and sends the CANCEL;
a deadline passing sends one too; :meth:`~Exchange.cancel_all` sends one for
everything in flight when the client closes. To an instance without the
feature nothing is sent, and a withdrawn request stays in its table until
its answer or deadline, which is how long that instance still works on it,
so a peer's :meth:`~Exchange.load` keeps counting it.

To an instance whose record lists the ``batch`` feature
(``docs/protocol.md``, "Batches"), a request started while others are in
flight there is queued, not sent: the peer's queue goes as one batch when
it holds :data:`~meshkit.wire.SEND_BATCH_PAIRS` requests, else at the end of
the loop turn (a lone request still goes at once). A queued request settled
before then (its deadline, a withdrawal, the client closing) is never sent
and so never cancelled; one whose batch the peer cannot take is settled
:class:`NotDelivered` through its future rather than from ``start``.

The three outcomes are internal: :mod:`meshkit.client` and
:mod:`meshkit.publish` turn them into retries and
:class:`~meshkit.errors.CallError` subclasses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import wire
from .clock import SYSTEM_CLOCK, Clock, TimerHandle
from .codes import ErrorCode
from .config import Settings
from .context import current_call
from .errors import ProtocolError
from .peer import Peer
from .untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.exchange")

# How long a closing peer's socket may keep trying to deliver the CANCELs sent
# just before it closed (a closing client's last word to the instance).
_CANCEL_LINGER_MS = 200


class NotDelivered(Exception):
    """The request cannot have run: not sent, never reached the instance, or refused unstarted."""


class LostInFlight(Exception):
    """The peer was lost with the request in flight: it may have run."""


class DeadlinePassed(Exception):
    """The request's deadline passed before its answer arrived (or before it was sent)."""


class Outgoing(Protocol):
    """A request as its sender holds it (:class:`~meshkit.wire.CallMessage`, :class:`~meshkit.wire.PushMessage`)."""

    def frames(self, id: int, timeout_ms: int | None) -> list[bytes]:
        """The frames of one attempt."""


@dataclass(slots=True)
class _Entry:
    future: asyncio.Future[wire.Answer]
    timer: TimerHandle
    on_item: Callable[[Any], None] | None = None  # a streamed call's ITEMs go here (meshkit.streams)


def _nothing(peer: Peer) -> None:
    return None


class Exchange:
    """Correlates one client's requests with their answers (see the module doc).

    ``on_idle(peer)`` is called when the last request in flight on a
    draining peer is settled (its owner may close it). Ids start at a random
    32-bit value drawn from ``rng``, so a restarted client does not reuse
    the ids its predecessor left in flight.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        on_idle: Callable[[Peer], None] = _nothing,
    ) -> None:
        self._clock = clock
        # The system clock is read and scheduled on directly: this is the hot path of every call.
        self._system = clock is SYSTEM_CLOCK
        self._now = time.monotonic if self._system else clock.now
        self._ids = itertools.count((rng or random.Random()).getrandbits(32) + 1)
        self._tables: dict[Peer, dict[int, _Entry]] = {}
        self._on_idle = on_idle
        self._throttle = LogThrottle(log, settings.log_repeat_interval)
        self.dropped = 0  # answers that matched nothing or could not be read
        self.cancels_sent = 0
        # Requests started this turn, sent at its end in batches (wire.FEATURE_BATCH): see _flush.
        self._queued: dict[Peer, list[tuple[int, list[bytes]]]] = {}
        self._flush_scheduled = False

    def load(self, peer: Peer) -> int:
        """How many requests are in flight on ``peer`` (what instance choice compares)."""
        table = self._tables.get(peer)
        return len(table) if table else 0

    @property
    def in_flight(self) -> int:
        """Requests in flight on every peer."""
        return sum(map(len, self._tables.values()))

    def start(self, peer: Peer, message: Outgoing, deadline: float) -> asyncio.Future[wire.Answer]:
        """Send ``message`` to ``peer``; return the future that settles it (see the module doc).

        ``deadline`` is on this exchange's clock. Raises :class:`DeadlinePassed`
        if it has passed already and :class:`NotDelivered` if the peer cannot
        take the frames; in both cases nothing was sent.
        """
        return self._start(peer, message, deadline, None)[1]

    def start_stream(self, peer: Peer, message: Outgoing, deadline: float,
                     on_item: Callable[[Any], None]) -> tuple[int, asyncio.Future[wire.Answer]]:
        """Like :meth:`start`, for a streamed call: each ITEM's value goes to ``on_item``; returns ``(id, future)``.

        The future settles on the stream's end (REPLY or ERROR) like any
        other request's; the deadline bounds the whole stream.
        """
        return self._start(peer, message, deadline, on_item)

    def _start(self, peer: Peer, message: Outgoing, deadline: float,
               on_item: Callable[[Any], None] | None) -> tuple[int, asyncio.Future[wire.Answer]]:
        remaining = deadline - self._now()
        if remaining <= 0:
            raise DeadlinePassed()
        request_id = next(self._ids)
        table = self._tables.get(peer)
        loop = asyncio.get_running_loop()
        frames = message.frames(request_id, int(remaining * 1000))  # wire.timeout_ms, inlined
        # Others in flight there and it takes batches: more requests are likely this turn, sent with it.
        batched = bool(table) and wire.FEATURE_BATCH in peer.record.features
        # Alone on the peer (a sequential caller): the transport checks for arrivals at once, not next turn.
        if not batched and not peer.send(frames, not table):
            raise NotDelivered(f"{peer.key} could not take the request")
        future: asyncio.Future[wire.Answer] = loop.create_future()
        if table is None:
            table = self._tables[peer] = {}
        timer = (loop.call_later if self._system else self._clock.call_later)(
            remaining, self._expire, peer, request_id)
        table[request_id] = _Entry(future, timer, on_item)
        if batched:
            queued = self._queued.get(peer)
            if queued is None:
                queued = self._queued[peer] = []
            queued.append((request_id, frames))
            if len(queued) >= wire.SEND_BATCH_PAIRS:  # full: it goes now, while the turn makes the rest
                del self._queued[peer]
                self._send_queued(peer, queued)
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return request_id, future

    def _flush(self) -> None:
        """Send the requests queued this turn, each peer's packed into batches (:func:`wire.pack_batches`).

        Only those still in flight go: one settled meanwhile (its deadline,
        its waiter withdrew it, its peer failed) is not sent. A batch the peer
        cannot take settles each of its requests :class:`NotDelivered`.
        """
        self._flush_scheduled = False
        queued, self._queued = self._queued, {}
        for peer, requests in queued.items():
            self._send_queued(peer, requests)

    def _send_queued(self, peer: Peer, requests: list[tuple[int, list[bytes]]]) -> None:
        table = self._tables.get(peer)
        if not table:
            return
        live = [frames for request_id, frames in requests if request_id in table]
        if not live:
            return
        for batch in wire.pack_batches(live):
            if not peer.send(batch):
                for i in range(0, len(batch), 2):
                    self._undelivered(peer, batch[i])

    def _undelivered(self, peer: Peer, header_frame: bytes) -> None:
        future = self._settle(peer, wire.peek_id(header_frame))
        if future is not None and not future.done():
            future.set_exception(NotDelivered(f"{peer.key} could not take the request"))

    def withdraw(self, peer: Peer, future: asyncio.Future[wire.Answer]) -> None:
        """The waiter of ``future`` (a request on ``peer``) gave up: CANCEL it there, if the peer can hear it."""
        if wire.FEATURE_CANCEL not in peer.record.features:
            return  # it keeps working: the entry counts in its load until the answer or the deadline
        table = self._tables.get(peer)
        if not table:
            return
        # A scan, not a second index: cancellations are rare, every call would pay for the index.
        request_id = next((rid for rid, entry in table.items() if entry.future is future), None)
        if request_id is not None:
            self._settle(peer, request_id)
            if not self._is_queued(peer, request_id):  # else never sent: nothing to cancel
                self._cancel(peer, request_id, self._why_withdrawn())

    def _is_queued(self, peer: Peer, request_id: int) -> bool:
        return any(rid == request_id for rid, _ in self._queued.get(peer, ()))

    def cancel_all(self) -> None:
        """CANCEL everything in flight on peers that can hear it (the client is closing; nothing is settled)."""
        for peer, table in self._tables.items():
            unsent = {request_id for request_id, _ in self._queued.pop(peer, ())}  # never to be sent now
            if table and wire.FEATURE_CANCEL in peer.record.features:
                for request_id in table:
                    if request_id not in unsent:
                        self._cancel(peer, request_id, wire.CLOSED)
                peer.close_linger_ms = _CANCEL_LINGER_MS

    def _why_withdrawn(self) -> str:
        """The reason a waiter gave up, passed down a chain: a handler cancelled for its deadline says so."""
        ctx = current_call()  # the call being served by the task that made this request, if any
        if ctx is None:
            return wire.CANCELLED
        if ctx.flag.is_set:
            return ctx.flag.reason or wire.CANCELLED
        if ctx.deadline is not None and self._now() >= ctx.deadline:
            return wire.DEADLINE  # the handler's own deadline cancelled it
        return wire.CANCELLED

    def _cancel(self, peer: Peer, request_id: int, reason: str) -> None:
        if peer.send(wire.encode_cancel(request_id, reason)):
            self.cancels_sent += 1

    def forget(self, peer: Peer) -> None:
        """Drop ``peer``'s (empty) table: its owner closed it with nothing in flight."""
        if not self._tables.get(peer):  # a request still in flight is settled by abandon() only
            self._tables.pop(peer, None)

    def receive(self, peer: Peer, frames: list[bytes]) -> None:
        """Settle the request that the answer ``frames`` from ``peer`` is for (never raises).

        A batch (an even number of frames over two, ``wire.FEATURE_BATCH``)
        is taken pair by pair, each as if it had come alone.
        """
        if len(frames) > 2 and not len(frames) % 2:
            for pair in wire.pairs_of(frames):
                self._receive(peer, pair)
        else:
            self._receive(peer, frames)

    def _receive(self, peer: Peer, frames: list[bytes]) -> None:
        try:
            answer = wire.decode_answer(frames)
        except ProtocolError as exc:
            self.dropped += 1
            self._throttle.log(exc.code, logging.WARNING, "dropping an unreadable answer from %s: %s", peer.key, exc)
            return
        if answer.kind == wire.ITEM:
            self._item(peer, answer)
            return
        future = self._settle(peer, answer.id)
        if future is None:
            self.dropped += 1  # late (after its deadline), or never asked of this peer
            return
        if future.done():
            return  # its waiter gave up
        error = answer.error
        if error is None:
            future.set_result(answer)
        elif error.code == ErrorCode.DRAINING:
            future.set_exception(NotDelivered(f"{peer.key} is draining"))
            peer.mark_draining()
        elif error.code == ErrorCode.UNKNOWN_SERVICE:
            # The record is stale: its endpoint now belongs to another service.
            future.set_exception(NotDelivered(f"{peer.key} serves another service"))
            peer.retire(f"serves another service now ({clip(error.message)})")
        else:
            future.set_result(answer)

    def _item(self, peer: Peer, answer: wire.Answer) -> None:
        """An ITEM: hand it to its stream, which stays in flight (one for no stream is dropped)."""
        table = self._tables.get(peer)
        entry = table.get(answer.id) if table else None
        if entry is None or entry.on_item is None or entry.future.done():
            self.dropped += 1
            return
        entry.on_item(answer.value)

    def abandon(self, peer: Peer, *, lost: bool) -> None:
        """Settle everything in flight on ``peer``, which failed: lost if ``lost``, else not delivered."""
        table = self._tables.pop(peer, None)
        if not table:
            return
        for entry in table.values():
            entry.timer.cancel()
            if not entry.future.done():
                entry.future.set_exception(LostInFlight() if lost else NotDelivered(f"{peer.key} was not reached"))

    def _settle(self, peer: Peer, request_id: int) -> asyncio.Future[wire.Answer] | None:
        table = self._tables.get(peer)
        entry = table.pop(request_id, None) if table else None
        if entry is None:
            return None
        entry.timer.cancel()
        if not table and peer.draining:
            self._on_idle(peer)
        return entry.future

    def _expire(self, peer: Peer, request_id: int) -> None:
        future = self._settle(peer, request_id)
        if future is not None:
            if wire.FEATURE_CANCEL in peer.record.features and not self._is_queued(peer, request_id):
                # The instance stops at its own deadline too, but its clock started later than ours.
                self._cancel(peer, request_id, wire.DEADLINE)
            if not future.done():
                future.set_exception(DeadlinePassed())
