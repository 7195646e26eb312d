"""One WebSocket client of a gateway: the line protocol, one message per line.

What a request means is :class:`~meshkit.gateway.session.Session`'s, as for
a TCP connection; :class:`WsConnection` adds how messages travel:

* **One message, one line.** A text message holds one request, batch or
  notification (JSON, no trailing newline needed); every answer and push is
  one text message. A binary message is read the same way (as UTF-8).
* **Messages are bounded** by ``max_line`` bytes: a longer one closes the
  connection with 1009 (message too big); aiohttp stops reading it at the
  bound, so it is never held whole.
* **Backpressure** as on TCP: answers and pushes wait in a queue bounded by
  ``max_output`` bytes (one larger message on its own still goes out);
  while more than half of it waits, no further message is read; a client
  that lets more pile up is dropped as a ``slow_consumer``.
* **Keep-alive**: the gateway pings every ``ws_heartbeat`` seconds and closes
  a connection whose pong does not come within half of that; it answers the
  client's pings.
* **Close codes say why** (:func:`close_code`): 1000 when the client left,
  1001 when the gateway is stopping (``shutting_down``), 1009 for a message
  over ``max_line``, 1011 for an internal error, and ``4000 + n`` for the
  gateway's error ``-32000 - n`` (4007 ``idle_timeout``, 4009
  ``slow_consumer``, 4011 ``banned``, 4013 ``address_limited``); the
  reason is the error's stable string. Closing with an error also sends the
  error (``id`` null) as a last message first.
* **Ending** as on TCP: on the client's close, requests in flight finish
  (their answers cannot be delivered any more), then the socket closes;
  :meth:`finish` answers what was asked before closing. Closing takes at
  most ``close_timeout`` seconds, then the connection is reset.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from aiohttp import WSMsgType, web

from ..untrusted import clip
from . import jsonrpc
from .session import Session

log = logging.getLogger("meshkit.gateway.connection")

_UNITS_PER_TURN = 64  # as on TCP: work between two yields to other clients
_BYTES_PER_UNIT = 1024
_GOING_AWAY = 1001
_TOO_BIG = 1009
_INTERNAL = 1011


def close_code(code: int | None) -> int:
    """The WebSocket close code for closing with the gateway's error ``code`` (None: a plain close)."""
    if code is None:
        return 1000
    if code == jsonrpc.SHUTTING_DOWN:
        return _GOING_AWAY
    if code == jsonrpc.INTERNAL_ERROR:
        return _INTERNAL
    if -32099 <= code <= -32000:
        return 4000 + (-32000 - code)
    return 4000


class WsConnection(Session):
    """A WebSocket client from upgrade to close. Run it with :meth:`serve`."""

    def __init__(self, conn_id: str, ws: web.WebSocketResponse, transport: Any,
                 **kwargs: Any) -> None:
        super().__init__(conn_id, **kwargs)
        self._ws = ws
        self._transport = transport
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._high = self.options.max_output // 2
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    # -- life cycle -----------------------------------------------------------

    async def serve(self) -> None:
        """Read and serve until the client closes (or :meth:`finish`/:meth:`close`)."""
        self._writer = asyncio.create_task(self._write_loop(), name=f"gateway-ws-write-{self.id}")
        self._reading = asyncio.create_task(self._read_loop(), name=f"gateway-ws-read-{self.id}")
        try:
            await self._reading
        except asyncio.CancelledError:
            if not self._reading.cancelled():
                raise
        finally:
            if not self.closed:
                await self.wait_quiet(self.options.request_timeout + 1.0)
                self.close(close_as=self._ws.close_code or 1000)
            await self.wait_closed()
            self.done.set()

    def close_finished(self, code: int) -> None:
        """Close with :func:`close_code` of ``code`` once :meth:`finish` has answered everything."""
        self.close(close_as=close_code(code), reason=jsonrpc.REASONS.get(code, ""))

    def close(self, code: int | None = None, message: str = "", *, abort: bool = False,
              close_as: int | None = None, reason: str = "") -> None:
        """Stop reading and running requests now; with ``code``, send that error first.

        The WebSocket close code is ``close_as`` if given, else
        :func:`close_code` of ``code``.
        """
        if self.closed:
            return
        if code is not None and not abort:
            self.send(self.dialect.error_line(None, code, message))
            if self.closed:
                return
        self.closed = True
        if self._reading is not None:
            self._reading.cancel()
        self.cancel_work()
        ws_code = close_as if close_as is not None else close_code(code)
        why = reason or (jsonrpc.REASONS.get(code, "") if code is not None else "")
        self._closer = asyncio.ensure_future(self._shut(ws_code, why, abort))

    def close_for(self, code: int) -> None:
        """Close with :func:`close_code` of ``code`` (the error itself was sent)."""
        self.close(close_as=close_code(code), reason=jsonrpc.REASONS.get(code, ""))

    async def wait_closed(self) -> None:
        """Return once the socket is closed (after :meth:`close`)."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _shut(self, ws_code: int, reason: str, abort: bool) -> None:
        timeout = self.options.close_timeout
        if not abort:
            try:
                # What was queued goes out first, then the close frame.
                await asyncio.wait_for(self._flushed(), timeout)
                await asyncio.wait_for(self._ws.close(code=ws_code, message=reason.encode()),
                                       timeout)
            except (asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
                abort = True
        if self._writer is not None:
            self._writer.cancel()
        if abort and self._transport is not None:
            self._transport.abort()

    async def _flushed(self) -> None:
        while self._out and self._writer is not None and not self._writer.done():
            self._drained.clear()
            await self._drained.wait()

    # -- output ---------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Queue one message; False if closed. Drops a slow consumer (see the module doc)."""
        if self.closed or self._ws.closed:
            return False
        if self._out and self._out_bytes + len(line) > self.options.max_output:
            self._throttle.log("slow_consumer", logging.WARNING,
                               "dropping slow consumer %s (%s): more than %d bytes unread",
                               self.id, self.peer, self.options.max_output)
            self._metrics.gateway_rejected("slow_consumer")
            self.close(abort=True)
            return False
        self._out.append(line)
        self._out_bytes += len(line)
        self._metrics.gateway_message("out")
        if self._out_bytes > self._high:
            self._drained.clear()
        self._wake.set()
        return True

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    line = self._out[0]
                    await self._ws.send_frame(line.rstrip(b"\n"), WSMsgType.TEXT)
                    self._out.popleft()
                    self._out_bytes -= len(line)
                    if self._out_bytes <= self._high:
                        self._drained.set()
                self._drained.set()
        except (ConnectionError, OSError, RuntimeError):
            self.close(abort=True)  # the client is gone

    # -- input ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        budget = _UNITS_PER_TURN
        while not self.closed:
            await self._drained.wait()  # pauses here while the client does not read
            msg = await self._ws.receive()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                self.last_active = self._clock()
                data = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
                budget -= max(self.handle_line(data), len(data) // _BYTES_PER_UNIT)
                if budget <= 0:
                    budget = _UNITS_PER_TURN
                    await asyncio.sleep(0)
                continue
            if msg.type == WSMsgType.ERROR:
                self._on_error(msg.data)
            return  # CLOSE, CLOSING, CLOSED, ERROR

    def _on_error(self, exc: Any) -> None:
        code = getattr(exc, "code", None)
        if code == _TOO_BIG:
            self._metrics.gateway_message("in")
            self._metrics.gateway_rejected("line_too_long")
            self._report("invalid")
        else:
            self._throttle.log("ws_error", logging.INFO, "websocket %s (%s): %s", self.id,
                               self.peer, clip(str(exc)))
