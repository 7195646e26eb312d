"""The serving side of an instance: its embedded ROUTER and the dispatch behind it.

:class:`Server` binds a ``ROUTER`` on a port the kernel picks (or one from the
configured range), reads back the endpoint it really got, and answers every
message it can attribute to a sender:

* a CALL runs the ``@rpc`` handler in its own task (async handlers) or in the
  thread pool (plain ones), under a :class:`~meshkit.context.CallContext`
  carrying the deadline, the span and the caller's metadata. An async handler
  still running at its deadline is cancelled; a plain one whose deadline has
  passed before a thread picks it up is not started.
* a PUSH runs the topic's handlers; pushes from one sender are handled one
  after another, in arrival order, and each is acknowledged when done.
* a handler (of a CALL or a PUSH) that raises :class:`~meshkit.errors.RefusedError`
  answers with that error's code and message, and nothing is logged above debug.
* a PING is answered with the state and the number of requests in flight.
* anything malformed gets an ERROR (``bad_request``, ``unsupported_version``,
  ...) and a log line; the server keeps serving everyone else.

Draining (see :meth:`Server.drain`): new CALLs are answered ``draining`` (the
caller sends them elsewhere, nothing ran); pushes and work in flight finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import zmq

from . import wire
from .config import Settings
from .context import CallContext, reset_current, set_current
from .errors import DEADLINE_EXCEEDED, DRAINING, OVERLOADED, REPLY_TOO_LARGE, ProtocolError, RefusedError
from .handlers import Handler, HandlerTable
from .metrics import Metrics
from .record import DRAINING as STATE_DRAINING
from .record import UP
from .timing import DeadlineCancel, run_with_deadline, wait_event
from .trace import TraceContext
from .transport import SocketPump

log = logging.getLogger("meshkit.server")


# Pushes from one publisher waiting for their handler; beyond this they are refused.
MAX_QUEUED_PUSHES = 10_000


class Server:
    """Receives and answers everything sent to one instance."""

    def __init__(
        self,
        service: str,
        table: HandlerTable,
        settings: Settings,
        ctx: zmq.Context[zmq.Socket[bytes]],
        executor: Executor,
        metrics: Metrics,
    ) -> None:
        self.service = service
        self.table = table
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.state = UP
        self.inflight = 0
        # Monotonic time of the last CALL received. Pushes do not count: they
        # are served while draining, so a steady publisher must not be able
        # to hold a stopping instance for its whole grace period.
        self.last_call = 0.0
        self._push_queues: dict[bytes, deque[tuple[wire.Header, bytes, float]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 2000)  # let the last replies out on close
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # ZeroMQ drops (and disconnects) a sender whose message exceeds this,
        # before Python ever sees it; the header allowance keeps the limit
        # about the payload.
        sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_size + 4096)
        self.sock = sock
        self.endpoint = ""
        self.pump = SocketPump(sock, self._on_message)

    def bind(self) -> str:
        """Bind on a kernel-chosen (or configured-range) port; return the advertised endpoint."""
        host = self.settings.bind_host
        address = f"tcp://{'*' if host in ('0.0.0.0', '') else host}"
        if self.settings.port_min:
            port = self.sock.bind_to_random_port(
                address, self.settings.port_min, self.settings.port_max + 1, max_tries=200
            )
        else:
            self.sock.bind(f"{address}:0")
            last = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
            port = int(last.rsplit(":", 1)[1])
        self.endpoint = f"tcp://{self.settings.advertised_host}:{port}"
        return self.endpoint

    def start(self) -> None:
        self.pump.start()

    async def drain(self, grace: float, quiet: float = 0.3) -> bool:
        """Stop taking new calls; wait for work in flight, up to ``grace`` seconds.

        Then wait until no call has arrived for ``quiet`` seconds (callers
        learn of the drain from the registry and from ``draining`` answers),
        still within ``grace``. Pushes keep being served meanwhile; new ones
        do not restart the quiet period, queued ones are finished like calls.
        Returns False if work was still running when the grace period ended.
        """
        self.state = STATE_DRAINING
        deadline = time.monotonic() + grace
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self.inflight or self._push_queues:
                self._idle.clear()
                if not await wait_event(self._idle, left):
                    break
                continue
            since = time.monotonic() - self.last_call
            if since >= quiet:
                return True
            await asyncio.sleep(min(quiet - since, left))
        if self.inflight:
            log.warning("drain grace of %.1fs ended with %d requests in flight", grace, self.inflight)
        return not self.inflight and not self._push_queues

    def close(self) -> None:
        """Close the socket; answers already queued are flushed for up to 2 s."""
        self.pump.stop()
        for task in self._tasks:
            task.cancel()
        self.sock.close()

    # -- receiving ------------------------------------------------------------

    def _on_message(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 3:
            self._reject(identity, _readable_id(frames), "bad_request", f"expected 2 frames, got {len(frames) - 1}")
            return
        try:
            header = wire.decode_header(frames[1])
        except ProtocolError as exc:
            self._reject(identity, exc.id, exc.code, str(exc))
            return
        kind = header.kind
        if kind == wire.CALL:
            self._on_call(identity, header, frames[2])
        elif kind == wire.PUSH:
            self._on_push(identity, header, frames[2])
        elif kind == wire.PING:
            self._send(identity, wire.encode_pong(header.id, self.state, self.inflight))
        else:
            log.warning("dropping unexpected %s from a peer", wire.KIND_NAMES.get(kind, kind))

    def _reject(self, identity: bytes, request_id: int, code: str, message: str) -> None:
        log.warning("rejected a message: %s: %s", code, message)
        self.metrics.incr(f"rejected.{code}")
        self._send(identity, wire.encode_error(request_id, code, message))

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        frames.insert(0, identity)
        self.pump.send(frames)

    def _deadline(self, header: wire.Header) -> float | None:
        if header.timeout_ms is None:
            return None
        return time.monotonic() + header.timeout_ms / 1000.0

    def _on_call(self, identity: bytes, header: wire.Header, body: bytes) -> None:
        self.last_call = time.monotonic()
        if header.target != self.service:
            self._reject(identity, header.id, "unknown_service",
                         f"this instance serves {self.service!r}, not {header.target!r}")
            return
        handler = self.table.methods.get(header.name)
        if handler is None:
            self._reject(identity, header.id, "unknown_method",
                         f"service {self.service!r} has no method {header.name!r}")
            return
        if self.state != UP:
            self._send(identity, wire.encode_error(header.id, DRAINING, "instance is draining"))
            return
        try:
            args, kwargs = wire.decode_call_body(body, header.id)
        except ProtocolError as exc:
            self._reject(identity, header.id, exc.code, str(exc))
            return
        deadline = self._deadline(header)
        if header.timeout_ms == 0:
            self._send(identity, wire.encode_error(header.id, DEADLINE_EXCEEDED, "deadline already passed"))
            return
        self._spawn(self._run_call(identity, header, handler, args, kwargs, deadline))

    def _spawn(self, coro: Any) -> None:
        self.inflight += 1
        self.metrics.inflight(self.inflight)
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.inflight -= 1
        if not self.inflight and not self._push_queues:
            self._idle.set()

    async def _run_call(
        self,
        identity: bytes,
        header: wire.Header,
        handler: Handler,
        args: list[Any],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> None:
        started = time.monotonic()
        ctx = CallContext(self.service, header.name, TraceContext.from_traceparent(header.traceparent),
                          deadline, header.meta or {})
        set_current(ctx)  # this task runs in its own copy of the context
        code: str | None = None
        try:
            result = await self._invoke(handler, args, kwargs, deadline)
            try:
                frames = wire.encode_reply(header.id, result)
            except (TypeError, ValueError, OverflowError) as exc:
                code = "handler_error"
                log.error("%s returned a value MessagePack cannot encode: %s", header.name, exc)
                frames = wire.encode_error(header.id, code, f"result cannot be encoded: {exc}", type(exc).__name__)
            else:
                if len(frames[1]) > self.settings.max_message_size:
                    code = REPLY_TOO_LARGE
                    frames = wire.encode_error(header.id, code, f"result of {len(frames[1])} bytes exceeds "
                                               f"max_message_size {self.settings.max_message_size}")
        except _BadArguments as exc:
            code = "bad_arguments"
            log.warning("bad arguments for %s: %s", header.name, exc)
            frames = wire.encode_error(header.id, code, str(exc))
        except DeadlineCancel:
            code = DEADLINE_EXCEEDED
            log.info("%s cancelled at its deadline", header.name)
            frames = wire.encode_error(header.id, code, "deadline passed while running")
        except RefusedError as exc:
            code, frames = _refused(header, exc)
        except Exception as exc:
            code, frames = self._handler_failed(header, exc)
        self.metrics.call_served(header.name, (time.monotonic() - started) * 1000, code)
        self._send(identity, frames)

    def _handler_failed(self, header: wire.Header, exc: BaseException) -> tuple[str, list[bytes]]:
        log.error("handler %s raised %s: %s", header.name, type(exc).__name__, exc, exc_info=exc)
        tb = "".join(traceback.format_exception(exc)) if self.settings.debug else None
        return "handler_error", wire.encode_error(
            header.id, "handler_error", str(exc), type(exc).__name__, tb)

    async def _invoke(self, handler: Handler, args: list[Any], kwargs: dict[str, Any],
                      deadline: float | None) -> Any:
        if handler.is_async:
            try:
                coro = handler.fn(*args, **kwargs)
            except TypeError as exc:
                # Calling a coroutine function only binds the arguments, so a
                # TypeError here is always the caller's.
                raise _BadArguments(str(exc)) from None
            if deadline is None:
                return await coro
            return await run_with_deadline(coro, deadline)
        problem = handler.check_arguments(args, kwargs)
        if problem is not None:
            raise _BadArguments(problem)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, contextvars.copy_context().run, _run_plain, handler.fn, args, kwargs, deadline
        )

    # -- pushes ---------------------------------------------------------------

    def _on_push(self, identity: bytes, header: wire.Header, body: bytes) -> None:
        handlers = self.table.topic_handlers(header.name)
        if not handlers:
            self._reject(identity, header.id, "unknown_method",
                         f"service {self.service!r} has no handler for topic {header.name!r}")
            return
        queue = self._push_queues.get(identity)
        if queue is not None:
            if len(queue) >= MAX_QUEUED_PUSHES:
                # Unbounded, a fast publisher and a slow handler would eat the
                # memory; refused, the publisher counts it undelivered.
                if len(queue) == MAX_QUEUED_PUSHES:
                    log.warning("push queue of one publisher is full (%d); refusing %s until it drains",
                                MAX_QUEUED_PUSHES, header.name)
                self.metrics.incr(f"rejected.{OVERLOADED}")
                self._send(identity, wire.encode_error(header.id, OVERLOADED, "too many pushes queued"))
                return
            queue.append((header, body, time.monotonic()))
            return
        queue = deque([(header, body, time.monotonic())])
        self._push_queues[identity] = queue
        self._spawn(self._drain_pushes(identity, queue))

    async def _drain_pushes(self, identity: bytes, queue: deque[tuple[wire.Header, bytes, float]]) -> None:
        try:
            while queue:
                header, body, received = queue.popleft()
                await self._run_push(identity, header, body, received)
        finally:
            self._push_queues.pop(identity, None)

    async def _run_push(self, identity: bytes, header: wire.Header, body: bytes, received: float) -> None:
        ctx = CallContext(self.service, header.name, TraceContext.from_traceparent(header.traceparent),
                          None, header.meta or {})
        token = set_current(ctx)
        code: str | None = None
        try:
            payload = wire.unpack(body)
            for handler in self.table.topic_handlers(header.name):
                await self._invoke(handler, [payload], {}, None)
            frames = wire.encode_ack(header.id)
        except ProtocolError as exc:
            code = exc.code
            log.warning("push to %s with undecodable payload: %s", header.name, exc)
            frames = wire.encode_error(header.id, exc.code, str(exc))
        except _BadArguments as exc:
            code = "bad_arguments"
            log.error("subscriber for %s must take one payload argument: %s", header.name, exc)
            frames = wire.encode_error(header.id, code, str(exc))
        except RefusedError as exc:
            code, frames = _refused(header, exc)
        except Exception as exc:
            code, frames = self._handler_failed(header, exc)
        finally:
            reset_current(token)
        self.metrics.push_received(header.name, (time.monotonic() - received) * 1000, code)
        self._send(identity, frames)


def _readable_id(frames: list[bytes]) -> int:
    """The request id of a message with the wrong frame count, if its header is readable (else 0)."""
    if len(frames) < 2:
        return 0
    try:
        return wire.decode_header(frames[1]).id
    except ProtocolError as exc:
        return exc.id


def _refused(header: wire.Header, exc: RefusedError) -> tuple[str, list[bytes]]:
    # A refusal is the handler's answer, not its failure: no traceback, no error log.
    log.debug("%s refused: %s", header.name, exc.message)
    return exc.code, wire.encode_error(header.id, exc.code, exc.wire_message, type(exc).__name__)


class _BadArguments(Exception):
    pass


def _run_plain(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], deadline: float | None) -> Any:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineCancel()
    return fn(*args, **kwargs)
