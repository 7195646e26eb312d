"""One client connection to a gateway: read lines, run requests, write answers and pushes.

Contracts of :class:`Connection`:

* **Lines are bounded.** A line longer than ``max_line`` bytes is answered
  with ``line_too_long`` (once) and skipped up to its newline; the next line
  is read normally.
* **Requests run concurrently**, at most ``max_inflight`` per connection;
  one over the limit is answered ``too_many_in_flight`` and not run. Answers
  go out in completion order.
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
* **Batches are bounded**: at most ``max_batch`` items (a larger one is
  refused whole with ``batch_too_large``), their mesh calls count against
  ``max_inflight`` like single requests, and their answer is cut to
  ``max_output`` bytes (:func:`~meshkit.gateway.jsonrpc.answer_line`).
* **Bad input costs one answer, never the connection.** Invalid lines and
  params get a JSON-RPC error; an answer JSON cannot hold becomes an
  ``internal_error`` for that request alone.
* **Rate.** With a ``request_bucket``, a request over the connection's
  request rate is answered ``rate_limited`` and not run. ``judge(conn,
  kind)`` hears of each invalid line or item (``"invalid"``), for the ban policy.
* **Built-in methods** (``mesh.*``, :mod:`meshkit.gateway.builtin`) are
  answered here; everything else goes to the ``call`` function given by the
  gateway.
* **Ending.** On the client's EOF, requests in flight finish and are
  answered, then the connection closes. :meth:`finish` does the same from
  the gateway's side and sends a closing error first; :meth:`close` closes at
  once. Closing delivers what was written within ``close_timeout`` seconds
  (acknowledged by the client's TCP), else resets the connection
  (:mod:`meshkit.gateway.linger`); a slow consumer is reset at once.
  :attr:`done` is set only once the socket is really closed, and the gateway
  counts the connection until then.
* **Echoes are clipped** (:func:`meshkit.untrusted.clip`), and log lines a
  client can cause are throttled (:class:`~meshkit.untrusted.LogThrottle`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..metrics import Metrics
from ..topics import topic_matches
from ..untrusted import LogThrottle, clip
from . import builtin, dialect, jsonrpc
from .jsonrpc import Invalid, Request, RpcError
from .limits import TokenBucket
from .linger import close_within, reset
from .options import GatewayOptions

log = logging.getLogger("meshkit.gateway.connection")

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


CallFunction = Callable[["Connection", Request], Awaitable[Any]]
JudgeFunction = Callable[["Connection", str], None]
Doc = dict[str, Any] | None  # a response object, or None for a notification


class Connection:
    """A client connection, from accept to close. Run it with :meth:`serve`."""

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
        self.id = conn_id
        self.options = options
        self.dialect = dialect.named(options.dialect)
        self.gateway_id = gateway_id
        self.subscriptions: set[str] = set()
        self.inflight = 0
        #: The client's IP address (from the PROXY header behind HAProxy); None: not limited.
        self.address = address
        self.services_used: set[str] = set()  # services this client called (told if one is gone)
        self._initial = initial
        self._bucket = request_bucket
        self._judge = judge
        self._reader = reader
        self._writer = writer
        self._call = call
        self._metrics = metrics
        self._clock = clock
        # Shared by the gateway's connections, so a flood of clients logs once.
        self._throttle = throttle or LogThrottle(log)
        self.last_active = clock()
        self.closed = False
        self.done = asyncio.Event()
        self._quiet = asyncio.Event()  # set while nothing is in flight
        self._quiet.set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._oversize = 0  # the largest line over max_output that may still be waiting to go out
        # Pausing reads must start well before the slow-consumer limit, or a
        # client that pipelines requests would be dropped instead of slowed.
        writer.transport.set_write_buffer_limits(high=min(_HIGH_WATER, options.max_output // 2))
        if peer is None:
            raw = writer.get_extra_info("peername")
            peer = f"{raw[0]}:{raw[1]}" if isinstance(raw, tuple) else str(raw or "")
        self.peer = peer  # "ip:port" of the client, for logs and the connection's state

    # -- life cycle -----------------------------------------------------------

    async def serve(self) -> None:
        """Read and serve until the client closes (or :meth:`finish`/:meth:`close`)."""
        self._read_task = asyncio.create_task(self._read_loop(), name=f"gateway-read-{self.id}")
        try:
            await self._read_task
        except asyncio.CancelledError:
            if not self._read_task.cancelled():
                raise  # serve() itself was cancelled
        finally:
            if not self.closed:
                # EOF from the client: answer what it already asked, then close.
                await self._wait_quiet(self.options.request_timeout + 1.0)
                self.close()
            await self.wait_closed()
            self.done.set()

    async def finish(self, code: int, message: str, wait: float, linger: float = 1.0) -> None:
        """Close from the gateway's side without losing a request; return once closed.

        The client first gets an error with ``id`` null and ``code`` (for
        example ``shutting_down``): its cue to stop sending here and
        reconnect. Requests that were already on their way are still read for
        ``linger`` seconds (or until the client closes), and everything read
        is answered (waiting up to ``wait`` s); then the connection closes.
        """
        if self.closed:
            await self.done.wait()
            return
        self.send(self.dialect.error_line(None, code, message))
        read_task = self._read_task
        if read_task is not None and not read_task.done():
            await asyncio.wait({read_task}, timeout=linger)
            read_task.cancel()
        await self._wait_quiet(wait)
        self.close()
        await self.done.wait()

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
        self.closed = True
        if self._read_task is not None:
            self._read_task.cancel()
        for task in self._tasks:
            task.cancel()
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

    def idle(self, now: float) -> bool:
        """Whether it is open, nothing was received for ``idle_timeout`` s and nothing is in flight."""
        timeout = self.options.idle_timeout
        return (timeout > 0 and not self.closed and not self.inflight
                and now - self.last_active >= timeout)

    # -- output ---------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Queue one line for the client; False if the connection is (now) closed.

        Drops the client as a slow consumer when more than ``max_output``
        bytes wait to be sent, not counting the largest line over
        ``max_output`` still waiting (so one big answer reaches a client
        that reads).
        """
        if self.closed or self._writer.transport.is_closing():
            return False  # the client is gone: asyncio would only log each write to a lost socket
        self._writer.write(line)
        self._metrics.gateway_message("out")
        limit = self.options.max_output
        backlog = self._writer.transport.get_write_buffer_size()
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

    def push(self, topic: str, line: bytes) -> bool:
        """Send a pushed notification if the client subscribed to ``topic``."""
        if self.closed or not topic_matches(self.subscriptions, topic):
            return False
        return self.send(line)

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
                        cost = max(self._on_line(line), len(line) // _BYTES_PER_UNIT)
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
        self._metrics.gateway_rejected("line_too_long")
        self._report("invalid")
        self.send(self.dialect.error_line(
            None, jsonrpc.LINE_TOO_LONG,
            f"line longer than {self.options.max_line} bytes; skipped up to its newline"))

    def _on_line(self, line: bytes) -> int:
        """Handle one line; return how many items it held (at least 1), its cost in turns."""
        self._metrics.gateway_message("in")
        parsed = jsonrpc.parse_line(line, self.options.max_batch)
        if parsed is None:
            return 1
        immediate: list[dict[str, Any] | None] = []
        running: list[Awaitable[dict[str, Any] | None]] = []
        for item in parsed.items:
            outcome = self._prepare(item)
            if isinstance(outcome, dict) or outcome is None:
                immediate.append(outcome)
            else:
                running.append(outcome)
        if not running:
            self._answer(parsed.batch, immediate)
            return len(parsed.items)
        # Tasks at once (not coroutines for later) so every request starts now
        # and each is cancelled on close even if the answer is never sent.
        calls = [self._track(asyncio.ensure_future(c)) for c in running]
        self._track(asyncio.ensure_future(self._complete(parsed.batch, immediate, calls)))
        return len(parsed.items)

    def _track(self, task: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _prepare(self, item: jsonrpc.Item) -> dict[str, Any] | Awaitable[Doc] | None:
        """An answer now (or None: a notification), or an awaitable that produces it."""
        if isinstance(item, Invalid):
            self._metrics.gateway_rejected(jsonrpc.REASONS[item.code])
            self._report("invalid")
            return self.dialect.error_doc(item.id, item.code, item.message, item.data)
        if self._bucket is not None and not self._bucket.take(self._clock()):
            self._metrics.gateway_rejected("rate_limited")
            return None if item.notification else self.dialect.error_doc(
                item.id, jsonrpc.RATE_LIMITED,
                f"more than {self.options.request_rate:g} requests per second; not run")
        if item.method.startswith("mesh."):
            try:
                result = self._builtin(item)
            except RpcError as exc:
                self._metrics.gateway_rejected(jsonrpc.REASONS.get(exc.code, "error"))
                doc = self.dialect.error_doc(item.id, exc.code, exc.message, exc.data)
            except Exception as exc:
                # A bug in a built-in must cost its answer, not the connection
                # (raised here, it would end the read loop).
                self._throttle.log("builtin_failed", logging.ERROR, "built-in %s on %s failed",
                                   clip(item.method), self.id, exc_info=True)
                self._metrics.gateway_rejected("internal_error")
                doc = self.dialect.error_doc(item.id, jsonrpc.INTERNAL_ERROR,
                                        f"internal error: {type(exc).__name__}")
            else:
                doc = self.dialect.result_doc(item.id, result)
            return None if item.notification else doc
        if self.inflight >= self.options.max_inflight:
            self._metrics.gateway_rejected("too_many_in_flight")
            if item.notification:
                return None
            return self.dialect.error_doc(item.id, jsonrpc.TOO_MANY_IN_FLIGHT,
                                     f"more than {self.options.max_inflight} requests in flight "
                                     "on this connection; not run")
        # Counted now, not when the coroutine starts, so later items of the
        # same line (a batch) see it.
        self.inflight += 1
        self._quiet.clear()
        return self._run(item)

    async def _run(self, request: Request) -> dict[str, Any] | None:
        try:
            result = await self._call(self, request)
            doc = self.dialect.result_doc(request.id, result)
        except RpcError as exc:
            doc = self.dialect.error_doc(request.id, exc.code, exc.message, exc.data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._throttle.log("request_failed", logging.ERROR, "request %s on %s failed",
                               clip(request.method), self.id, exc_info=True)
            doc = self.dialect.error_doc(request.id, jsonrpc.INTERNAL_ERROR,
                                    f"internal error: {type(exc).__name__}")
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.last_active = self._clock()
                self._quiet.set()
        return None if request.notification else doc

    async def _complete(self, batch: bool, immediate: list[dict[str, Any] | None],
                        calls: list[asyncio.Future[Any]]) -> None:
        done = await asyncio.gather(*calls)
        self._answer(batch, [*immediate, *done])

    def _answer(self, batch: bool, docs: list[dict[str, Any] | None]) -> None:
        answers = [d for d in docs if d is not None]
        if not answers:
            return
        line, problems = self.dialect.answer_line(answers, batch, self.options.max_output)
        for problem in problems:
            self._throttle.log("answer_replaced", logging.WARNING, "on %s: %s", self.id, problem)
        self.send(line)

    async def _wait_quiet(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._quiet.wait(), timeout)
        except asyncio.TimeoutError:
            self._throttle.log("closing_in_flight", logging.WARNING,
                               "closing %s with %d requests still in flight", self.id, self.inflight)

    def _report(self, kind: str) -> None:
        if self._judge is not None:
            self._judge(self, kind)

    # -- built-in methods -------------------------------------------------------

    def _builtin(self, request: Request) -> Any:
        return builtin.call(self, request)
