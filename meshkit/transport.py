"""ZeroMQ sockets driven by the asyncio loop, without a future per message.

ZeroMQ's file descriptor is edge-triggered: it signals that the socket's
state *may* have changed, and any send or receive can consume that signal.
So a :class:`SocketPump` reads until ZeroMQ says there is nothing left
(``ZMQ_EVENTS`` without ``POLLIN``, or a receive's ``EAGAIN``: either
processed ZeroMQ's pending commands, so any later arrival signals the
descriptor anew), and schedules one more read pass after the sends it makes
(:meth:`SocketPump.send`): one pass per loop turn however many messages were
sent in it. Reading a
whole batch per wake-up, with no future per message, is what lets meshkit
keep up with (and pipelined, beat) a plain ``zmq.asyncio`` loop.

All sockets are used from the loop's thread only; ZeroMQ sockets are not
thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq

from .untrusted import LogThrottle

log = logging.getLogger("meshkit.transport")

MessageHandler = Callable[[list[bytes]], None]
# Joins messages for one destination into fewer (meshkit.wire.pack_batches, given by the socket's owner).
Packer = Callable[[list[list[bytes]]], list[list[bytes]]]

# Messages handled per wake-up before yielding to other tasks, so a flood on
# one socket cannot starve heartbeats and handlers. The byte bound keeps the
# batch in the CPU cache: reading megabytes before any handler runs made
# 64 KiB echoes a third slower than handling them as they come (profiled).
_BATCH = 256
_BATCH_BYTES = 256 * 1024

# pyzmq sends frames above its copy threshold (64 KiB) without copying, but
# each such frame then costs a round trip through pyzmq's garbage-collector
# thread, which needs the GIL; profiling showed a memcpy is far cheaper below
# about a megabyte.
_ZERO_COPY_MIN = 1 << 20

# Plain ints: pyzmq's enum members cost a conversion on every call.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)

# pyzmq's own send and recv, below its Python-level wrappers (zmq.sugar). The
# wrapper's send (keyword arguments, routing_id and group checks) cost 1-3 us
# a frame, the Cython call under it 0.3 us: per answer of three frames, about
# 2 us saved. recv_multipart asks ``getsockopt(RCVMORE)`` after every frame,
# and every getsockopt converts its option to an enum (1.8 us each); a frame
# received as a zmq.Frame carries ``more`` itself. Reading until EAGAIN instead
# of asking ``EVENTS`` before each message drops one more getsockopt per
# message. Measured on a 3-frame ROUTER message: 5.2 us a message before, 2.3
# after (a loop of 20,000, CPU time).
# Typed by hand: pyzmq's overloads do not cover the positional copy flag.
_send = cast(Callable[[zmq.Socket[bytes], bytes, int, bool], object], zmq.backend.Socket.send)
_recv = cast(Callable[[zmq.Socket[bytes], int, bool], zmq.Frame], zmq.backend.Socket.recv)
_get = cast(Callable[[zmq.Socket[bytes], int], int], zmq.backend.Socket.get)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# But an EAGAIN is a Python exception built by pyzmq (two imports and a
# strerror in its constructor): 2.8 us, against 1.2 us for asking
# ``ZMQ_EVENTS`` through the same Cython layer. A sequential caller's read
# passes find one message or none (the pass after each send finds none), so
# the first reads of a pass ask EVENTS first and never raise; a pass that has
# found this many goes on receiving until EAGAIN, one exception for a burst.
_ASK_FIRST = 2


class SocketPump:
    """Feeds every message arriving on ``sock`` to ``on_message`` in the loop.

    ``on_message`` must not raise; if it does anyway, the message is dropped
    and counted in :attr:`dropped`, because one bad message must never stop
    the socket. The traceback is logged once per exception type per
    ``log_interval`` seconds (with a count of the rest): a peer that found a
    way to make the handler fail must not also fill the disk.
    """

    def __init__(self, sock: zmq.Socket[bytes], on_message: MessageHandler, log_interval: float = 10.0,
                 *, user_id: bool = False, packer: Packer | None = None, join_at: int = 16) -> None:
        self.sock = sock
        self._packer = packer  # what send_soon(join=True) messages go through
        self._join_at = join_at  # ... as soon as this many wait for one identity
        # CurveZMQ (meshkit.zap): with ``user_id``, :attr:`user_id` holds the ZAP
        # User-Id of the message being delivered, while ``on_message`` runs.
        self._read_user_id = user_id
        self.user_id: str | None = None
        self.on_message = on_message
        self.dropped = 0
        self._throttle = LogThrottle(log, log_interval, max_causes=32)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._fd = -1
        self._outbox: list[list[bytes]] = []  # send_soon's messages, sent by flush
        self._joins: dict[bytes, list[list[bytes]]] = {}  # ... those that may be batched, by identity
        self._flush_scheduled = False
        self.unsent = 0  # send_soon's messages ZeroMQ refused

    def start(self) -> None:
        """Begin delivering messages (call from the loop's thread)."""
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        self.kick()

    def stop(self) -> None:
        """Stop delivering messages; the socket stays open."""
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1

    def send(self, frames: list[bytes], alone: bool = False) -> bool:
        """Send without blocking; False if ZeroMQ would block (peer unreachable or full).

        ``alone`` says the sender expects no other send this loop turn (a
        sequential caller's request, a lone answer): the read pass that
        follows a send is then replaced by asking ``ZMQ_EVENTS`` at once, and
        scheduled only if a message waits. Either way nothing that arrived is
        left unread; ``alone`` only picks the cheaper check (one EVENTS read
        instead of a loop callback and a pass, for one send; one pass, for a
        turn's many).
        """
        sock = self.sock
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                _send(sock, frame, _NOBLOCK_MORE if i < last else _NOBLOCK, len(frame) < _ZERO_COPY_MIN)
        except zmq.Again:
            # Only the first frame can be refused: ZeroMQ takes a multipart
            # message whole or not at all.
            self.kick()
            return False
        # The send may have consumed the FD's edge: read what may be waiting
        # (the FD signals only arrivals after that). Coalesced per loop turn:
        # 64 replies sent in one turn cost one read pass, not 64.
        if not self._scheduled:
            if alone and not _get(sock, _EVENTS) & _POLLIN:
                return True  # EVENTS processed ZeroMQ's commands: a later arrival signals the FD
            self.kick()
        return True

    def send_soon(self, frames: list[bytes], batch: bool = True, join: bool = False) -> None:
        """Queue a message to be sent at the end of this loop turn, with every other one queued in it.

        For a socket whose sends never block or fail (a ROUTER below
        ``ROUTER_MANDATORY`` drops instead): the server's answers. Sent one
        at a time, between handlers, each answer found libzmq's I/O thread
        idle and woke it (a write to its mailbox, a thread switch): py-spy
        put 41% of a pipelined server's loop thread in ``send``. Sent as a
        burst, one wake-up carries the turn's answers (3 us less server CPU
        per call pipelined). But waiting for the turn's end cost a lone call
        latency (sequential p50 up by a quarter), so with ``batch`` false
        (the sender knows no other message is coming) the message goes at
        once unless others are queued. Messages keep their order, and
        :meth:`flush` sends what is queued at once.

        With ``join`` (a ROUTER's ``[identity, header, body]`` to a peer that
        takes batches, ``wire.FEATURE_BATCH``), the messages to that identity
        go out through the pump's ``packer``, which joins them into batches
        (:func:`meshkit.wire.pack_batches`): as soon as ``join_at`` of them
        wait, else at the turn's end. A burst still cost libzmq work per
        message (its pipe, its encoder); batches on both sides took a fifth
        off the CPU of a pipelined call (bench/rpc.py, 61 to 49 us client and
        server together). One identity's messages keep their order whether
        they were queued with ``join`` or not: a message for an identity with
        joined messages waiting joins them, and unjoined messages queued
        earlier leave before a batch does (a server may start or stop
        batching to a peer within a turn).
        """
        if not batch and not self._outbox and not self._joins:
            self.send(frames, alone=True)
            return
        queued = self._joins.get(frames[0]) if self._joins else None
        if queued is not None:  # joined or not, behind what waits for the same identity: order kept
            queued.append(frames)
            if len(queued) >= self._join_at and self._packer is not None:  # a full batch goes now
                del self._joins[frames[0]]
                if self._outbox:  # older than it (this identity's before it took batches, too)
                    self._send_outbox()
                self._send_joined(self._packer(queued))
                return
        elif join and self._packer is not None:
            self._joins[frames[0]] = [frames]
        else:
            self._outbox.append(frames)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send every message :meth:`send_soon` queued (those ZeroMQ refuses are dropped, counted)."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        joins, self._joins = self._joins, {}
        if self.sock.closed:
            return
        self._send_outbox(outbox)
        packer = self._packer
        for queued in joins.values():  # only with a packer (send_soon)
            self._send_joined(queued if len(queued) == 1 or packer is None else packer(queued))

    def _send_outbox(self, outbox: list[list[bytes]] | None = None) -> None:
        """Send ``outbox`` (default: the queued unjoined messages, taken from the queue)."""
        if outbox is None:
            outbox, self._outbox = self._outbox, []
        for frames in outbox:
            if not self.send(frames):
                self.unsent += 1

    def _send_joined(self, messages: list[list[bytes]]) -> None:
        for frames in messages:
            if not self.send(frames):
                self.unsent += (len(frames) - 1) // 2  # each message in it

    def kick(self) -> None:
        """Schedule a read pass (needed after any send: see the module doc)."""
        if not self._scheduled and self._loop is not None and self._fd >= 0:
            self._scheduled = True
            self._loop.call_soon(self._on_readable)

    def drain(self) -> None:
        """Deliver every message already waiting, now (not from the loop)."""
        self._on_readable()

    def _on_readable(self) -> None:
        self._scheduled = False
        sock = self.sock
        if self._fd < 0 or sock.closed:
            return
        budget = _BATCH_BYTES
        read_user_id = self._read_user_id
        for n in range(_BATCH):
            if budget <= 0:
                break  # yield to the handlers, then read on (kick below)
            if n < _ASK_FIRST and not _get(sock, _EVENTS) & _POLLIN:
                return  # nothing left: a later arrival signals the FD
            try:
                frame = _recv(sock, _NOBLOCK, False)
            except zmq.Again:
                return  # likewise
            if read_user_id:
                self.user_id = _user_id(frame)
            frames = [frame.bytes]
            while frame.more:  # a multipart message arrives whole: no part can be missing
                frame = _recv(sock, _NOBLOCK, False)
                frames.append(frame.bytes)
            budget -= sum(map(len, frames))
            try:
                self.on_message(frames)
            except Exception as exc:
                self.dropped += 1
                self._throttle.log(type(exc).__name__, logging.ERROR, "message handler failed; message dropped",
                                   exc_info=exc)
            if self._fd < 0 or sock.closed:
                return  # the handler stopped the pump or closed the socket
        self.kick()


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the connection ``frame`` came on (CurveZMQ, meshkit.zap), if any.

    Only a zmq.Frame carries the connection's properties (measured cost in
    docs/performance.md, "CurveZMQ").
    """
    try:
        return cast(str, frame.get("User-Id"))
    except zmq.ZMQError:  # a connection ZAP did not authenticate has none
        return None
