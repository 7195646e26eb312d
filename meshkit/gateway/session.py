"""The semantics of one client, whatever carries its messages: TCP lines, WebSocket or HTTP.

A :class:`Session` is the one place where a client message (a request, a
batch or a notification, as one line of JSON) becomes answers: the TCP
listener (:mod:`.connection`), the WebSocket listener and the HTTP listener
(:mod:`.web`) subclass it and add only how bytes come in and go out.

Contracts of :class:`Session`:

* **Requests run concurrently**, at most ``max_inflight`` per session; one
  over the limit is answered ``too_many_in_flight`` and not run. Answers go
  out in completion order, one answer (a line) per message.
* **Batches are bounded**: at most ``max_batch`` items (a larger one is
  refused whole with ``batch_too_large``), their mesh calls count against
  ``max_inflight`` like single requests, and their answer is cut to
  ``max_output`` bytes (:func:`~meshkit.gateway.jsonrpc.answer_line`).
* **Bad input costs one answer, never the session.** Invalid messages and
  params get a JSON-RPC error; an answer JSON cannot hold becomes an
  ``internal_error`` for that request alone.
* **Rate.** With a ``request_bucket``, a request over the client's request
  rate is answered ``rate_limited`` and not run. ``judge(session, kind)``
  hears of each invalid message or item (``"invalid"``), for the ban policy.
* **Built-in methods** (``mesh.*``, :mod:`meshkit.gateway.builtin`) are
  answered here; everything else goes to the ``call`` function given by the
  gateway, which sees the session (its ``id``, ``peer``, ``address``).
* **Where answers go.** :meth:`handle_line` hands the answer line to
  ``reply`` (default: :meth:`send`), exactly once per message, with ``None``
  when the message asked for no answer (notifications only, a blank line).
* **Echoes are clipped** (:func:`meshkit.untrusted.clip`), and log lines a
  client can cause are throttled (:class:`~meshkit.untrusted.LogThrottle`).

A subclass provides :meth:`send`, :meth:`close` and :meth:`wait_closed`,
sets :attr:`closed` when it closes, and calls :meth:`cancel_work` there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..metrics import Metrics
from ..topics import topic_matches
from ..untrusted import LogThrottle, clip
from . import builtin, dialect, eager, jsonrpc
from .jsonrpc import Invalid, Request, RpcError
from .limits import TokenBucket
from .options import GatewayOptions

log = logging.getLogger("meshkit.gateway.connection")

CallFunction = Callable[["Session", Request], Awaitable[Any]]
JudgeFunction = Callable[["Session", str], None]
Reply = Callable[[bytes | None], object]
Doc = dict[str, Any] | None  # a response object, or None for a notification
STREAM_NOTIFICATION = "mesh.stream"  # the method of the notifications that carry a streamed call's items


class Flag:
    """:class:`asyncio.Event`'s ``set``/``clear``/``is_set``/``wait``, with no deque until someone waits.

    An Event holds a deque of waiters from birth (~1.1 KB with the Event);
    every session has two, which nobody waits on until it closes, and a
    gateway holds thousands of sessions. Waiters share one future, shielded,
    so one waiter cancelled does not cancel the others.
    """

    __slots__ = ("_set", "_waiter")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set it and wake every waiter."""
        self._set = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        """Return (True) once it is set; at once if it is."""
        if self._set:
            return True
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)
        return True


class Session:
    """One client's requests, answers and subscriptions (see the module doc)."""

    #: Whether the session is a connection that lives on (its Redis state is kept,
    #: pushes can reach it); False for one HTTP request.
    stateful = True

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
    ) -> None:
        self.id = conn_id
        self.options = options
        self.dialect = dialect.named(options.dialect)
        self.gateway_id = gateway_id
        self.subscriptions: set[str] = set()
        self.inflight = 0
        #: The client's IP address (from the PROXY header behind HAProxy); None: not limited.
        self.address = address
        self.peer = peer  # "ip:port" of the client, for logs and the connection's state
        self.services_used: set[str] = set()  # services this client called (told if one is gone)
        self._bucket = request_bucket
        self._judge = judge
        self._call = call
        self._metrics = metrics
        self._clock = clock
        # Shared by the gateway's sessions, so a flood of clients logs once.
        self._throttle = throttle or LogThrottle(log)
        self.last_active = clock()
        self.closed = False
        self.done = Flag()  # set once the client's transport is gone
        self._quiet = Flag(True)  # set while nothing is in flight
        self._tasks: set[asyncio.Future[Any]] = set()
        #: What reads the client's messages while it is open (a carrier sets it); :meth:`finish` waits for it.
        self._reading: asyncio.Future[Any] | None = None

    # -- what a carrier provides ------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Queue one line (an answer or a push) for the client; False if it is (now) closed."""
        raise NotImplementedError

    def close(self, code: int | None = None, message: str = "", *, abort: bool = False) -> None:
        """Stop now; with ``code``, tell the client why first (see the subclass)."""
        raise NotImplementedError

    async def wait_closed(self) -> None:
        """Return once the client's transport is gone."""
        raise NotImplementedError

    def close_for(self, code: int) -> None:
        """Close now because of error ``code``, already sent (a WebSocket says which in its close code)."""
        self.close()

    async def finish(self, code: int, message: str, wait: float, linger: float = 1.0) -> None:
        """Close from the gateway's side without losing a request; return once closed.

        The client first gets an error with ``id`` null and ``code`` (for
        example ``shutting_down``): its cue to stop sending here and
        reconnect. Requests that were already on their way are still read for
        ``linger`` seconds (or until the client closes), and everything read
        is answered (waiting up to ``wait`` s); then the connection closes
        (:meth:`close_finished`) and :attr:`done` is awaited.
        """
        if self.closed:
            await self.done.wait()
            return
        self.send(self.dialect.error_line(None, code, message))
        await self._wait_reading(linger)
        self.stop_reading()
        await self.wait_quiet(wait)
        self.close_finished(code)
        await self.done.wait()

    async def _wait_reading(self, timeout: float) -> None:
        """Return once the client sends no more (its EOF), or after ``timeout`` s."""
        reading = self._reading
        if reading is not None and not reading.done():
            await asyncio.wait({reading}, timeout=timeout)

    def stop_reading(self) -> None:
        """Read no more from the client (the carrier's reading, :attr:`_reading`, ends)."""
        if self._reading is not None:
            self._reading.cancel()

    def close_finished(self, code: int) -> None:
        """How :meth:`finish` closes once everything read is answered (the error ``code`` was sent)."""
        self.close()

    # -- shared by every carrier --------------------------------------------------

    def idle(self, now: float) -> bool:
        """Whether it is open, nothing was received for ``idle_timeout`` s and nothing is in flight."""
        timeout = self.options.idle_timeout
        return (timeout > 0 and not self.closed and not self.inflight
                and now - self.last_active >= timeout)

    def push(self, topic: str, line: bytes) -> bool:
        """Send a pushed notification if the client subscribed to ``topic``."""
        if self.closed or not topic_matches(self.subscriptions, topic):
            return False
        return self.send(line)

    async def relay_stream(self, request_id: Any, items: AsyncIterator[Any]) -> Any:
        """Send each item of a streamed call as a ``mesh.stream`` notification; return the final result (null).

        ``{"method": "mesh.stream", "params": {"id": <request id>, "item": <item>}}``
        in this session's dialect, in order, then the request's answer. A
        session that cannot send before its answer (one HTTP request) gets the
        items as the answer's result, an array. Stops (and so cancels the
        stream) when the client is gone.
        """
        if not self.stateful:
            return [item async for item in items]
        async for item in items:
            if not self.send(self.dialect.notification_line(STREAM_NOTIFICATION, {"id": request_id, "item": item})):
                break  # closed: leaving the loop cancels the stream on the instance
        return None

    def cancel_work(self) -> None:
        """Cancel every request in flight (on close)."""
        for task in self._tasks:
            task.cancel()

    def handle_line(self, line: bytes, reply: Reply | None = None, *, more: bool = False) -> int:
        """Handle one message; return how many items it held (at least 1), its cost in turns.

        ``more``: other messages are being handled right after it (a chunk of
        lines), so its call starts with theirs, not at once on its own.
        """
        self._metrics.gateway_message("in")
        answer = reply or self._send_answer
        parsed = jsonrpc.parse_line(line, self.options.max_batch)
        if parsed is None:
            answer(None)
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
            answer(self._answer(parsed.batch, immediate))
            return len(parsed.items)
        if not parsed.batch:
            # One request: one task runs it and sends its answer (no second
            # task to gather a single result). A lone one (nothing else in
            # flight here, no message behind it) starts now: its mesh call is
            # sent in this turn of the loop, not the next. Others start at the
            # next turn, all together: their sends in one burst wake libzmq's
            # I/O thread once (all started at once, pipelined requests cost 85
            # us of gateway CPU each against 74, in one A/B of bench/edge.py:
            # medians of 3 runs).
            mine: list[asyncio.Future[Any]] = []  # the task, for the coroutine to leave the set with
            work = self._complete_one(running[0], answer, mine)
            if self.inflight == 1 and not more:
                task = eager.start(work)
            else:
                # The loop's create_task, not asyncio.ensure_future (its checks are 0.5 to 1 us of Python).
                task = asyncio.get_running_loop().create_task(work)
            if task is not None and not task.done():  # done: it failed (asyncio logs that)
                mine.append(task)
                self._tasks.add(task)  # it leaves the set itself (_complete_one)
                if self.closed:  # it closed the session itself (an answer to a slow consumer)
                    task.cancel()
            return 1
        # Tasks at once (not coroutines for later) so every request starts now
        # and each is cancelled on close even if the answer is never sent.
        calls = [self._track(asyncio.ensure_future(c)) for c in running]
        self._track(asyncio.ensure_future(self._complete(parsed.batch, immediate, calls, answer)))
        return len(parsed.items)

    def error_line(self, code: int, message: str, data: dict[str, Any] | None = None) -> bytes:
        """An error with ``id`` null in this session's dialect, counted and judged as invalid input."""
        self._metrics.gateway_rejected(jsonrpc.REASONS.get(code, "error"))
        self._report("invalid")
        return self.dialect.error_line(None, code, message, data)

    def _send_answer(self, line: bytes | None) -> None:
        if line is not None:
            self.send(line)

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
            doc = self._run_builtin(item)
            return None if item.notification else doc
        if self.inflight >= self.options.max_inflight:
            self._metrics.gateway_rejected("too_many_in_flight")
            if item.notification:
                return None
            return self.dialect.error_doc(item.id, jsonrpc.TOO_MANY_IN_FLIGHT,
                                          f"more than {self.options.max_inflight} requests in "
                                          "flight on this connection; not run")
        # Counted now, not when the coroutine starts, so later items of the
        # same line (a batch) see it.
        self.inflight += 1
        self._quiet.clear()
        return self._run(item)

    def _run_builtin(self, item: Request) -> dict[str, Any]:
        try:
            result = self._builtin(item)
        except RpcError as exc:
            self._metrics.gateway_rejected(jsonrpc.REASONS.get(exc.code, "error"))
            return self.dialect.error_doc(item.id, exc.code, exc.message, exc.data)
        except Exception as exc:
            # A bug in a built-in must cost its answer, not the session
            # (raised here, it would end the carrier's read loop).
            self._throttle.log("builtin_failed", logging.ERROR, "built-in %s on %s failed",
                               clip(item.method), self.id, exc_info=True)
            self._metrics.gateway_rejected("internal_error")
            return self.dialect.error_doc(item.id, jsonrpc.INTERNAL_ERROR,
                                          f"internal error: {type(exc).__name__}")
        return self.dialect.result_doc(item.id, result)

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

    async def _complete_one(self, call: Awaitable[Doc], answer: Reply, mine: list[asyncio.Future[Any]]) -> None:
        try:
            answer(self._answer(False, [await call]))
        finally:
            # Itself, not by a done callback: that callback is one more turn of
            # the loop per request, which a lone request pays for alone. (A task
            # cancelled before it starts ends with its session, never counted again.)
            # ``mine`` holds its task once made: asyncio.current_task() is Python
            # code on 3.11, about 1% of the gateway's CPU (py-spy).
            if mine:
                self._tasks.discard(mine[0])

    async def _complete(self, batch: bool, immediate: list[dict[str, Any] | None],
                        calls: list[asyncio.Future[Any]], answer: Reply) -> None:
        done = await asyncio.gather(*calls)
        answer(self._answer(batch, [*immediate, *done]))

    def _answer(self, batch: bool, docs: list[dict[str, Any] | None]) -> bytes | None:
        answers = [d for d in docs if d is not None]
        if not answers:
            return None
        line, problems = self.dialect.answer_line(answers, batch, self.options.max_output)
        for problem in problems:
            self._throttle.log("answer_replaced", logging.WARNING, "on %s: %s", self.id, problem)
        return line

    async def wait_quiet(self, timeout: float) -> None:
        """Return once nothing is in flight, or after ``timeout`` s (logged)."""
        try:
            await asyncio.wait_for(self._quiet.wait(), timeout)
        except asyncio.TimeoutError:
            self._throttle.log("closing_in_flight", logging.WARNING,
                               "closing %s with %d requests still in flight", self.id, self.inflight)

    def _builtin(self, request: Request) -> Any:
        return builtin.call(self, request)

    def _report(self, kind: str) -> None:
        if self._judge is not None:
            self._judge(self, kind)
