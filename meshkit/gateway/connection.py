"""One TCP client connection to a gateway: read lines, hand them to the session, write answers and pushes.

What a request means (limits in flight, batches, rate, built-ins, errors) is
:class:`~meshkit.gateway.session.Session`'s, shared with the WebSocket and
HTTP listeners. :class:`Connection` adds how lines travel over TCP:

* **Lines are bounded.** A line longer than ``max_line`` bytes is answered
  with ``line_too_long`` (once) and skipped up to its newline; the next line
  is read normally.
* **Backpressure.** Writes never block the gateway. While more than
  ``_HIGH_WATER`` bytes (or half of ``max_output``, if that is less) wait to
  be sent, no further requests are read, not even the rest of a chunk
  already received (the client's own sends back up). A client that lets
  more than ``max_output`` bytes pile up (it stopped reading pushes) is
  dropped as a ``slow_consumer``. One answer larger than ``max_output`` on
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
  :attr:`done` is set only once the socket is really closed, and the gateway
  counts the connection until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..metrics import Metrics
from ..untrusted import LogThrottle
from . import jsonrpc
from .limits import TokenBucket
from .linger import close_within, reset
from .options import GatewayOptions
from .session import CallFunction, JudgeFunction, Session

log = logging.getLogger("meshkit.gateway.connection")

__all__ = ["CallFunction", "Connection", "JudgeFunction"]

_READ_SIZE = 64 * 1024
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


class Connection(Session):
    """A TCP client connection, from accept to close. Run it with :meth:`serve`."""

    def __init__(
        self,
        conn_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        options: GatewayOptions,
        call: CallFunction,
        metrics: Metrics,
        gateway_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        throttle: LogThrottle | None = None,
        initial: bytes = b"",
        peer: str | None = None,
        address: str | None = None,
        request_bucket: TokenBucket | None = None,
        judge: JudgeFunction | None = None,
    ) -> None:
        if peer is None:
            raw = writer.get_extra_info("peername")
            peer = f"{raw[0]}:{raw[1]}" if isinstance(raw, tuple) else str(raw or "")
        super().__init__(conn_id, options=options, call=call, metrics=metrics,
                         gateway_id=gateway_id, clock=clock, throttle=throttle or LogThrottle(log),
                         peer=peer, address=address, request_bucket=request_bucket, judge=judge)
        self._initial = initial
        self._reader = reader
        self._writer = writer
        self._closer: asyncio.Task[None] | None = None
        self._oversize = 0  # the largest line over max_output that may still be waiting to go out
        self._pending: list[bytes] = []  # answers for the loop's next turn (_send_answer)
        self._pending_bytes = 0
        # Pausing reads must start well before the slow-consumer limit, or a
        # client that pipelines requests would be dropped instead of slowed.
        writer.transport.set_write_buffer_limits(high=min(_HIGH_WATER, options.max_output // 2))

    # -- life cycle -----------------------------------------------------------

    async def serve(self) -> None:
        """Read and serve until the client closes (or :meth:`finish`/:meth:`close`)."""
        self._reading = asyncio.create_task(self._read_loop(), name=f"gateway-read-{self.id}")
        try:
            await self._reading
        except asyncio.CancelledError:
            if not self._reading.cancelled():
                raise  # serve() itself was cancelled
        finally:
            if not self.closed:
                # EOF from the client: answer what it already asked, then close.
                await self.wait_quiet(self.options.request_timeout + 1.0)
                self.close()
            await self.wait_closed()
            self.done.set()

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
        if self._reading is not None:
            self._reading.cancel()
        self.cancel_work()
        self._closer = asyncio.ensure_future(self._shut(abort))

    async def wait_closed(self) -> None:
        """Return once the socket is closed (after :meth:`close`; at once if never closed)."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _shut(self, abort: bool) -> None:
        transport = self._writer.transport
        if abort:
            reset(transport)
        elif not await close_within(transport, self.options.close_timeout):
            self._throttle.log("close_reset", logging.WARNING,
                               "reset %s (%s): what was written was not delivered within %gs",
                               self.id, self.peer, self.options.close_timeout)
            self._metrics.gateway_rejected("close_timeout")
        try:
            await asyncio.wait_for(self._writer.wait_closed(), _LOST_WAIT)
        except Exception:  # a reset connection reports its error here: it is closed all the same
            pass

    # -- output ---------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Queue one line for the client; False if the connection is (now) closed.

        Drops the client as a slow consumer when more than ``max_output``
        bytes wait to be sent, not counting the largest line over
        ``max_output`` still waiting (so one big answer reaches a client
        that reads).
        """
        transport = self._writer.transport
        if self.closed or transport.is_closing():
            return False  # the client is gone: asyncio would only log each write to a lost socket
        if self._pending:
            self._pending.append(line)  # behind answers not written yet: order is kept
            self._pending_bytes += len(line)
        else:
            transport.write(line)
        return self._sent(line, transport.get_write_buffer_size() + self._pending_bytes)

    def _send_answer(self, line: bytes | None) -> None:
        """Answers that complete in one turn of the event loop go out in one write.

        Replies from the mesh arrive in bursts: the requests they answer
        finish in the same turn, and one ``send()`` system call each was
        8.5% of a gateway's CPU per request under pipelined load. They wait
        here until the loop's next turn (no longer), then go as one write.
        """
        if line is None or self.closed or self._writer.transport.is_closing():
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(line)
        self._pending_bytes += len(line)
        self._sent(line, self._writer.transport.get_write_buffer_size() + self._pending_bytes)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._pending_bytes = 0
        if not self._writer.transport.is_closing():  # close() flushes first; an abort empties it
            self._writer.transport.write(data)

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

    # -- input ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        buf = bytearray()
        skipping = False  # inside an over-long line, discarding up to its newline
        max_line = self.options.max_line
        budget = _UNITS_PER_TURN  # over the connection's life: turns do not restart per chunk
        pending, self._initial = self._initial, b""  # bytes read with the PROXY header
        try:
            while not self.closed:
                await self._writer.drain()  # pauses here while the client does not read
                chunk = pending or await self._reader.read(_READ_SIZE)
                pending = b""
                if not chunk:
                    return
                self.last_active = self._clock()
                start = len(buf)
                buf += chunk
                while not self.closed:
                    newline = buf.find(b"\n", start)
                    if newline < 0:
                        if len(buf) > max_line:
                            if not skipping:
                                self._line_too_long()
                                skipping = True
                            buf.clear()
                        break
                    line = bytes(buf[:newline])
                    del buf[:newline + 1]
                    start = 0
                    cost = 1
                    if skipping:
                        skipping = False  # the tail of the over-long line
                    elif len(line) > max_line:
                        self._line_too_long()
                    else:
                        cost = max(self.handle_line(line), len(line) // _BYTES_PER_UNIT)
                    budget -= cost
                    if budget <= 0:
                        budget = _UNITS_PER_TURN
                        await asyncio.sleep(0)  # let other clients' work run
                        await self._writer.drain()  # and stop here while our answers pile up
        except (ConnectionError, OSError):
            # The client reset the connection: nobody can read an answer, so
            # its requests in flight are cancelled (and CANCELs sent on) now.
            self.close(abort=True)

    def _line_too_long(self) -> None:
        self._metrics.gateway_message("in")
        self.send(self.error_line(
            jsonrpc.LINE_TOO_LONG,
            f"line longer than {self.options.max_line} bytes; skipped up to its newline"))
