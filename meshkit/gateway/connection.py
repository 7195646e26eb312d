"""One TCP client connection to a gateway: read lines, hand them to the session, write answers and pushes.

:class:`Connection` is the socket's :class:`asyncio.Protocol` (no reader
task, no stream objects: a gateway holds thousands of connections, and
those cost ~3 KB each). Lines are handled as they are received, in
``data_received``.

What a request means (limits in flight, batches, rate, built-ins, errors) is
:class:`~meshkit.gateway.session.Session`'s, shared with the WebSocket and
HTTP listeners. :class:`Connection` adds how lines travel over TCP:

* **Lines are bounded.** A line longer than ``max_line`` bytes is answered
  with ``line_too_long`` (once) and skipped up to its newline; the next line
  is read normally.
* **Backpressure.** Writes never block the gateway. While more than
  ``_HIGH_WATER`` bytes (or half of ``max_output``, if that is less) wait to
  be sent, no further requests are read, not even the rest of a chunk
  already received (the client's own sends back up). Answers given while
  a chunk of lines is handled, or in one turn of the event loop while other
  requests are in flight, go out in one write; a lone answer goes out at
  once. A client that lets more than ``max_output`` bytes pile up (it
  stopped reading pushes) is dropped as a ``slow_consumer``. One answer larger than ``max_output`` on
  its own still goes out: the limit counts what piles up besides the
  largest line waiting.
* **Fairness.** After ``_UNITS_PER_TURN`` units of work the connection lets
  the event loop run other work. A line costs one unit per item (a batch of
  64 costs 64) and at least one per KiB, whatever it holds (built-in
  requests and invalid items cost no mesh call but still cost time).
* **Ending.** On the client's EOF, requests in flight finish and are
  answered, then the connection closes. :meth:`finish` does the same from
  the gateway's side and sends a closing error first; :meth:`close` closes at
  once. Closing delivers what was written within ``close_timeout`` seconds
  (acknowledged by the client's TCP), else resets the connection
  (:mod:`meshkit.gateway.linger`); a slow consumer is reset at once.
  :attr:`done` is set (and ``on_done`` called) only once the socket is
  really closed, and the gateway counts the connection until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from ..metrics import Metrics
from ..untrusted import LogThrottle
from . import jsonrpc
from .limits import TokenBucket
from .linger import close_within, reset
from .options import GatewayOptions
from .session import CallFunction, Flag, JudgeFunction, Session

log = logging.getLogger("meshkit.gateway.connection")

__all__ = ["CallFunction", "Connection", "JudgeFunction"]

# Output queued beyond this pauses reading requests from the client.
_HIGH_WATER = 256 * 1024
# Work handled before letting other connections run: one 64 KiB read of
# short lines is ~1,600 of them, and a 16 KiB line of 8,190 batch items took
# ~40 ms to answer, all with no other client served. A unit is one item or
# one KiB of line. Measured: answering an item costs ~7 us, parsing a KiB
# 2-26 us (long strings to the densest tiny items), so a turn stays under ~2 ms.
_UNITS_PER_TURN = 64
_BYTES_PER_UNIT = 1024
# After a close, how long asyncio may take to report the socket closed
# (one loop iteration, normally).
_LOST_WAIT = 1.0

Hook = Callable[["Connection"], None]


class Connection(Session, asyncio.Protocol):
    """A TCP client connection, from accept to close: the protocol of its socket.

    Attach it to a transport (``connection_made``, or as a listener's
    protocol); ``on_open`` is called then, and may refuse the client
    (:meth:`close` with a code); ``on_done`` once the socket is gone.
    :meth:`serve` waits for the end.
    """

    def __init__(
        self,
        conn_id: str,
        *,
        options: GatewayOptions,
        call: CallFunction,
        metrics: Metrics,
        gateway_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        throttle: LogThrottle | None = None,
        peer: str = "",
        address: str | None = None,
        request_bucket: TokenBucket | None = None,
        judge: JudgeFunction | None = None,
        on_open: Hook | None = None,
        on_done: Hook | None = None,
    ) -> None:
        super().__init__(conn_id, options=options, call=call, metrics=metrics,
                         gateway_id=gateway_id, clock=clock, throttle=throttle or LogThrottle(log),
                         peer=peer, address=address, request_bucket=request_bucket, judge=judge)
        self._on_open = on_open
        self._on_done = on_done
        self._transport: asyncio.Transport | None = None
        self._closer: asyncio.Future[None] | None = None
        self._oversize = 0  # the largest line over max_output that may still be waiting to go out
        self._pending: list[bytes] = []  # answers waiting to go out in one write (_send_answer)
        self._pending_bytes = 0
        self._flush_soon = False  # _flush_turn is scheduled for the loop's next turn
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._skipping = False  # inside an over-long line, discarding up to its newline
        self._budget = _UNITS_PER_TURN  # over the connection's life: turns do not restart per chunk
        self._output_full = False  # the transport said pause_writing: handle no line
        self._yielding = False  # a turn's budget is spent: the rest waits for the loop's next turn
        self._handling = False  # inside _handle_lines: answers wait for the end of the chunk
        self._eof = False
        self._ending = False  # answering what came before the EOF, then closing
        self._reading_paused = False
        self._read_end = Flag()  # set once nothing more will be read (EOF, stop_reading, close)
        self._lost = Flag()  # set by connection_lost

    # -- life cycle -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (meshkit/loops.py) implement
        # asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if not self.peer:
            raw = transport.get_extra_info("peername")
            self.peer = f"{raw[0]}:{raw[1]}" if isinstance(raw, tuple) else str(raw or "")
        if self._transport.is_closing():
            # A client gone before it was handed over just ends (uvloop refuses
            # settings on a closed transport, and no connection_lost may follow).
            self.close(abort=True)
            return
        # Pausing reads must start well before the slow-consumer limit, or a
        # client that pipelines requests would be dropped instead of slowed.
        self._transport.set_write_buffer_limits(high=min(_HIGH_WATER, self.options.max_output // 2))
        if self._on_open is not None:
            self._on_open(self)

    async def serve(self) -> None:
        """Return once the connection is closed and its socket gone (it serves by itself)."""
        await self.done.wait()

    async def _wait_reading(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._read_end.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def stop_reading(self) -> None:
        """Read no more from the client; lines received but not handled yet are dropped."""
        self._read_end.set()
        self._buf.clear()
        self._pause_reading()

    def _pause_reading(self) -> None:
        transport = self._transport
        if not self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = True
            transport.pause_reading()

    def close(self, code: int | None = None, message: str = "", *, abort: bool = False) -> None:
        """Stop reading and running requests now; with ``code``, send that error (``id`` null) first.

        What was written is delivered within ``close_timeout`` seconds, else
        (or at once with ``abort``) the connection is reset: no socket
        outlives the bound. Await :meth:`wait_closed` for the socket to be gone.
        """
        if self.closed:
            return
        if code is not None and not abort:
            self.send(self.dialect.error_line(None, code, message))  # may drop a slow consumer
            if self.closed:
                return
        if abort:
            self._pending = []
        else:
            self._flush()  # what was answered goes out before the close
        self.closed = True
        self._read_end.set()
        self._buf.clear()
        self.cancel_work()
        self._closer = asyncio.ensure_future(self._shut(abort))
        self._closer.add_done_callback(self._finished)

    async def wait_closed(self) -> None:
        """Return once the socket is closed (after :meth:`close`; at once if never closed)."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _shut(self, abort: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        if abort:
            reset(transport)
        elif not await close_within(transport, self.options.close_timeout):
            self._throttle.log("close_reset", logging.WARNING,
                               "reset %s (%s): what was written was not delivered within %gs",
                               self.id, self.peer, self.options.close_timeout)
            self._metrics.gateway_rejected("close_timeout")
        try:
            await asyncio.wait_for(self._lost.wait(), _LOST_WAIT)
        except asyncio.TimeoutError:
            pass

    def _finished(self, _closer: asyncio.Future[None]) -> None:
        self.done.set()
        if self._on_done is not None:
            self._on_done(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self._read_end.set()
        if self.closed:
            return
        if self._eof:
            self._end_of_input()  # what it asked before its EOF still runs; the answers are lost
        else:
            # The client reset the connection: nobody can read an answer, so
            # its requests in flight are cancelled (and CANCELs sent on) now.
            self.close(abort=True)

    def eof_received(self) -> bool:
        self._eof = True
        if not self._yielding and not self._output_full:
            self._end_of_input()
        return True  # keep the socket open for the answers still to come

    def _end_of_input(self) -> None:
        """The client's EOF, once every line before it is handled: answer what it asked, then close."""
        if self._ending:
            return
        self._ending = True
        self._read_end.set()
        self._track(asyncio.ensure_future(self._close_when_quiet()))

    async def _close_when_quiet(self) -> None:
        await self.wait_quiet(self.options.request_timeout + 1.0)
        self.close()

    # -- output ---------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Queue one line for the client; False if the connection is (now) closed.

        Drops the client as a slow consumer when more than ``max_output``
        bytes wait to be sent, not counting the largest line over
        ``max_output`` still waiting (so one big answer reaches a client
        that reads).
        """
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            return False  # the client is gone: asyncio would only log each write to a lost socket
        if self._pending:
            self._pending.append(line)  # behind answers not written yet: order is kept
            self._pending_bytes += len(line)
        else:
            transport.write(line)
        return self._sent(line, transport.get_write_buffer_size() + self._pending_bytes)

    def _send_answer(self, line: bytes | None) -> None:
        """An answer goes out now if nothing can join it; else with the others of its turn, in one write.

        One ``send()`` per answer was 8.5% of a gateway's CPU pipelined. So
        while other requests are in flight an answer waits for the loop's next
        turn (no longer); one given while a chunk of lines is handled, for its
        end. A lone answer (the sequential client's) goes out at once: holding
        it would cost a loop turn of latency and save no write.
        """
        transport = self._transport
        if line is None or self.closed or transport is None or transport.is_closing():
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        backlog = transport.get_write_buffer_size() + self._pending_bytes
        if self._handling:  # _handle_lines flushes at the end of its chunk
            pass
        elif not self.inflight:
            self._flush()
        elif not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_turn)
        self._sent(line, backlog)

    def _flush_turn(self) -> None:
        self._flush_soon = False
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._pending_bytes = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():  # close() flushes first; an abort empties it
            transport.write(data)

    def _sent(self, line: bytes, backlog: int) -> bool:
        """Count one line queued with ``backlog`` bytes waiting; drop a slow consumer (False)."""
        self._metrics.gateway_message("out")
        limit = self.options.max_output
        if backlog <= limit:
            self._oversize = 0  # caught up: no big line is waiting any more
            return True
        if len(line) > limit:
            self._oversize = max(self._oversize, len(line))
        if backlog > limit + self._oversize:
            self._throttle.log("slow_consumer", logging.WARNING,
                               "dropping slow consumer %s (%s): more than %d bytes unread",
                               self.id, self.peer, limit)
            self._metrics.gateway_rejected("slow_consumer")
            self.close(abort=True)
            return False
        return True

    def pause_writing(self) -> None:
        self._output_full = True  # handle no more lines until the client reads
        self._pause_reading()

    def resume_writing(self) -> None:
        self._output_full = False
        if not self._yielding:
            self._handle_lines()

    # -- input ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed or self._read_end.is_set():
            return
        self.last_active = self._clock()
        self._buf += data
        if not self._yielding and not self._output_full:
            self._handle_lines()

    def _next_turn(self) -> None:
        self._yielding = False
        if not self._output_full:
            self._handle_lines()

    def _handle_lines(self) -> None:
        """Handle the complete lines received, within the turn's budget; then read on (or not)."""
        buf = self._buf
        max_line = self.options.max_line
        done = 0  # bytes of buf handled (deleted once, at the end: not per line)
        following = -1  # the end of the line after this one, once looked for
        nested, self._handling = self._handling, True
        try:
            while not self.closed and not self._output_full and not self._read_end.is_set():
                newline = following if following >= 0 else buf.find(b"\n", max(done, self._scanned))
                if newline < 0:
                    if len(buf) - done > max_line:
                        if not self._skipping:
                            self._line_too_long()
                            self._skipping = True
                        done = len(buf)
                    self._scanned = len(buf)
                    break
                line = bytes(buf[done:newline])
                done = newline + 1
                following = buf.find(b"\n", done)
                cost = 1
                if self._skipping:
                    self._skipping = False  # the end of the over-long line: skipped
                elif len(line) > max_line:
                    self._line_too_long()
                else:
                    # A line with more behind it starts with them (more=True), not alone.
                    cost = max(self.handle_line(line, more=following >= 0), len(line) // _BYTES_PER_UNIT)
                self._budget -= cost
                if self._budget <= 0:
                    # Let other clients' work run; the rest of buf waits for the next turn.
                    self._budget = _UNITS_PER_TURN
                    self._yielding = True
                    asyncio.get_running_loop().call_soon(self._next_turn)
                    break
        finally:
            del buf[:done]
            self._scanned = max(0, self._scanned - done)
            self._handling = nested
            if not nested and not self._flush_soon:  # else with the turn's answers
                self._flush()  # the chunk's answers (built-ins, errors) in one write
        transport = self._transport
        if self.closed or transport is None or transport.is_closing() or self._read_end.is_set():
            return
        if self._yielding or self._output_full:
            self._pause_reading()  # the client's sends back up meanwhile
        elif self._eof:
            self._end_of_input()
        elif self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _line_too_long(self) -> None:
        self._metrics.gateway_message("in")
        self.send(self.error_line(
            jsonrpc.LINE_TOO_LONG,
            f"line longer than {self.options.max_line} bytes; skipped up to its newline"))
