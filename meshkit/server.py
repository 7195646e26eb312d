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
  after another, in arrival order, and each is acknowledged when done
  (:mod:`meshkit.pushes`, which also numbers each publisher's stream).
* what a handler returned or raised becomes the answer in :mod:`meshkit.answers`.
* a PING is answered with the state and the number of requests held.
* a CANCEL (never answered) cancels the sender's call of that id, if it is
  still running (:mod:`meshkit.cancels`): an async handler's task is
  cancelled, a plain handler's ``current_call().cancelled`` becomes true;
  either way no answer is sent for it.
* anything malformed gets an ERROR (``bad_request``, ``unsupported_version``,
  ...) and a log line; the server keeps serving everyone else.

What a peer can make the server hold is bounded in requests and bytes
(:mod:`meshkit.quota`, :mod:`meshkit.inbox` and the ``max_*`` settings); a
request past a bound is answered ``overloaded`` and not run.
Every remote value echoed into an answer or a log line is clipped, and log
lines caused by remote input are throttled (one per cause per
``Settings.log_repeat_interval``, with a count of the rest). Answers sent to
a server are dropped and counted in :attr:`Server.dropped`.

Deadlines, the drain's grace and quiet period and the served-call timings
are read from the ``clock`` given to the constructor (the system clock
unless told), so unit tests drive them with :class:`meshkit.testing.FakeClock`.

Draining (see :meth:`Server.drain`): new CALLs are answered ``draining`` (the
caller sends them elsewhere, nothing ran); pushes and work in flight finish.

Method names starting with :data:`RESERVED_PREFIX` (``_mesh.``) belong to the
framework: a service's own table may not use them (:class:`ConfigError`), and
they are served from :meth:`Server.add_framework_method`'s table, also while
draining (they report on the instance, they do not do its work).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

import zmq

from . import access, wire, zap
from .answers import Answers
from .budget import Budget, request_cost
from .calls import run_call
from .cancels import RunningCalls
from .clock import SYSTEM_CLOCK, Clock
from .codes import ErrorCode, InstanceState, LocalCode
from .config import Settings
from .errors import ConfigError, ProtocolError
from .handlers import Handler, HandlerTable
from .limits import CallLimits
from .metrics import Metrics
from .observe.introspect import Introspection
from .observe.observer import Observer
from .pushes import PushSide
from .quota import CallQuota
from .streams import ServerStreams
from .timing import wait_event
from .transport import SocketPump
from .untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.server")

# Method names under this prefix are the framework's, never a service's.
RESERVED_PREFIX = "_mesh."

_CANCELLED = LocalCode.CANCELLED
_UP = InstanceState.UP  # read once per call: an enum attribute costs a lookup each time
# The inflight gauge is sent at most this often (seconds), and whenever it is
# zero: a datagram per call cost more than the gauge is worth (docs/performance.md).
INFLIGHT_REPORT_INTERVAL = 0.1
# Connections remembered as taking batched answers (16 bytes or so each); one forgotten gets single answers.
_MAX_BATCHERS = 4096


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
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        reserved = sorted(name for name in table.methods if name.startswith(RESERVED_PREFIX))
        if reserved:
            raise ConfigError(f"method names starting with {RESERVED_PREFIX!r} are reserved: {reserved}")
        self.service = service
        self.clock = clock
        self.table = table
        self._framework: dict[str, Handler] = {}
        table.cache_bytes = settings.topic_cache_bytes
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.state: str = InstanceState.UP  # or DRAINING
        self.inflight = 0
        self._inflight_reported = -INFLIGHT_REPORT_INTERVAL  # the first change is reported
        self.dropped = 0  # messages neither answered nor served (answers sent to a server)
        # Monotonic time of the last CALL received. Pushes do not count: they
        # are served while draining, so a steady publisher must not be able
        # to hold a stopping instance for its whole grace period.
        self.last_call = 0.0
        self.held = Budget(settings.max_inflight, settings.max_inflight_bytes)  # the whole instance
        self.quota = CallQuota(settings, self.held)  # what calls hold, per connection
        # Concurrency gates and resource leases, passed before each handler runs (docs/limits.md).
        self.limits = CallLimits(service, table, settings, clock=clock, metrics=metrics)
        self.throttle = LogThrottle(log, settings.log_repeat_interval, clock=clock.now)
        self.answers = Answers(settings, self.throttle)
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.running = RunningCalls()  # admitted calls, for CANCEL
        self.streams = ServerStreams(self.send, settings.max_message_size, clock)  # streamed calls, their credit
        self.pushes = PushSide(self)  # PUSH messages: their queues, numbered streams and handlers
        self._pushes = self.pushes.inbox
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 2000)  # let the last replies out on close
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # ZeroMQ drops (and disconnects) a sender whose frame exceeds this; 4 KiB is the header's allowance.
        sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_size + 4096)
        self.sock = sock
        self.endpoint = ""
        # CurveZMQ and access control (meshkit.zap, meshkit.access); both None when CURVE is off.
        self.door = zap.apply_server(sock, settings, ctx, lambda reason: metrics.incr(f"curve.refused.{reason}"))
        self.guard = access.guard_for(settings, service, self.door.trust if self.door else None)
        # Identities (connections) that sent a batch, so take batched answers; bounded, oldest forgotten.
        self._batchers: dict[bytes, None] = {}
        self.pump = SocketPump(sock, self._on_message, settings.log_repeat_interval, user_id=self.door is not None,
                               packer=functools.partial(wire.pack_batches, routing=1), join_at=wire.SEND_BATCH_PAIRS)
        # Observability hooks (meshkit.observe), set by the Service: spans and stats of
        # what is served, and the reserved _mesh.* methods.
        self.observer: Observer | None = None
        self.reserved: Introspection | None = None

    def bind(self, address: str | None = None) -> str:
        """Bind on a kernel-chosen (or configured-range) port; return the advertised endpoint.

        With ``address`` (a complete ZeroMQ address such as ``ipc:///tmp/x.sock``,
        for in-process tests), bind exactly there and advertise it as it is.
        """
        if address is not None:
            self.sock.bind(address)
            self.endpoint = address
            return address
        host = self.settings.bind_host
        address = f"tcp://{'*' if host in ('0.0.0.0', '') else host}"
        if self.settings.port_min:
            port = self.sock.bind_to_random_port(address, self.settings.port_min, self.settings.port_max + 1,
                                                 max_tries=200)
        else:
            self.sock.bind(f"{address}:0")
            last = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
            port = int(last.rsplit(":", 1)[1])
        self.endpoint = f"tcp://{self.settings.advertised_host}:{port}"
        return self.endpoint

    def start(self) -> None:
        self.pump.start()

    def add_framework_method(self, name: str, fn: Callable[..., Any]) -> None:
        """Serve ``fn`` as the framework method ``name`` (which must start with ``_mesh.``).

        ``fn`` is called like an ``@rpc`` handler (async on the loop, plain in
        the thread pool) and is served while draining too.
        """
        if not name.startswith(RESERVED_PREFIX):
            raise ValueError(f"framework method names start with {RESERVED_PREFIX!r}: {clip(name)!r}")
        self._framework[name] = Handler(name, fn, asyncio.iscoroutinefunction(fn))

    async def drain(self, grace: float, quiet: float = 0.3) -> bool:
        """Stop taking new calls; wait for work in flight, up to ``grace`` seconds.

        Then wait until no call has arrived for ``quiet`` seconds (callers
        learn of the drain from the registry and from ``draining`` answers),
        still within ``grace``. Pushes keep being served meanwhile; new ones
        do not restart the quiet period, queued ones are finished like calls.
        Returns False if work was still running when the grace period ended.
        """
        self.state = InstanceState.DRAINING
        deadline = self.clock.now() + grace
        while True:
            left = deadline - self.clock.now()
            if left <= 0:
                break
            if self.inflight or self._pushes.busy:
                self._idle.clear()
                if not await wait_event(self._idle, left, self.clock):
                    break
                continue
            since = self.clock.now() - self.last_call
            if since >= quiet:
                return True
            await self.clock.sleep(min(quiet - since, left))
        if self.inflight:
            log.warning("drain grace of %.1fs ended with %d requests in flight", grace, self.inflight)
        return not self.inflight and not self._pushes.busy

    def close(self) -> None:
        """Close the socket; answers already queued are flushed for up to 2 s."""
        self.pump.flush()  # answers queued in this loop turn
        self.pump.stop()
        for task in self._tasks:
            task.cancel()
        if self.door is not None:
            self.door.close()
        self.sock.close()

    # -- receiving ------------------------------------------------------------

    def _on_message(self, frames: list[bytes]) -> None:
        if not frames:
            self._drop("empty message")
            return
        identity = frames[0]
        n = len(frames)
        if n == 3:
            try:
                header = wire.decode_header(frames[1], max_size=self.settings.max_header_size,
                                            max_name=self.settings.max_name_length)
            except ProtocolError as exc:
                self.reject(identity, exc.id, exc.code, str(exc))
                return
            self._on_pair(identity, header, frames[1], frames[2])
        elif n > 3 and n % 2:
            self._on_batch(identity, frames)
        else:
            try:
                wire.split_request(frames[1:], max_size=self.settings.max_header_size,
                                   max_name=self.settings.max_name_length)
            except ProtocolError as exc:  # always: the frame count is wrong
                self.reject(identity, exc.id, exc.code, str(exc))

    def _on_batch(self, identity: bytes, frames: list[bytes]) -> None:
        """A batch (``wire.FEATURE_BATCH``): each pair served as if it came alone; the sender takes batches."""
        batchers = self._batchers
        if identity not in batchers:
            if len(batchers) >= _MAX_BATCHERS:
                del batchers[next(iter(batchers))]  # the oldest: it gets single answers again, no harm
            batchers[identity] = None
        max_size, max_name = self.settings.max_header_size, self.settings.max_name_length
        last = min(len(frames), 1 + 2 * wire.MAX_BATCH_PAIRS)
        for i in range(1, last, 2):
            header_frame = frames[i]
            try:
                header = wire.decode_header(header_frame, max_size=max_size, max_name=max_name)
            except ProtocolError as exc:
                self.reject(identity, exc.id, exc.code, str(exc))
                continue
            self._on_pair(identity, header, header_frame, frames[i + 1])
        for i in range(last, len(frames), 2):
            self.reject(identity, wire.peek_id(frames[i]), ErrorCode.BAD_REQUEST,
                        f"a batch holds at most {wire.MAX_BATCH_PAIRS} pairs")

    def _on_pair(self, identity: bytes, header: wire.Header, header_frame: bytes, body: bytes) -> None:
        kind = header.kind
        if kind == wire.CALL:
            self._on_call(identity, header, header_frame, body)
        elif kind == wire.PUSH:
            self.pushes.receive(identity, header, header_frame, body)
        elif kind == wire.CREDIT:
            if not self.streams.credit(identity, header.id, body):
                self._drop("CREDIT for no stream, or unreadable")
        elif kind == wire.CANCEL:
            if self.running.cancel(identity, header.id, wire.decode_cancel_reason(body)):
                self.metrics.incr("cancelled")
        elif kind == wire.PING:
            # What max_inflight bounds: calls being served and pushes queued or running.
            self.send(identity, wire.encode_pong(header.id, self.state, self.held.count))
        else:
            self._drop(f"unexpected {wire.KIND_NAMES[kind]}")

    def reject(self, identity: bytes, request_id: int, code: str, message: str) -> None:
        """Answer ``code``; ``message`` must already be short (remote values clipped)."""
        self.metrics.incr(f"rejected.{code}")
        self.throttle.log(code, logging.WARNING, "rejected a message: %s: %s", code, message,
                           extra={"code": code})
        self.send(identity, wire.encode_error(request_id, code, message))

    def _call_forbidden(self, identity: bytes, header: wire.Header) -> bool:
        """Answer ``forbidden`` and return True if the access policy refuses this call (meshkit.access).

        The caller is the ZAP User-Id of the connection the call came on;
        without CurveZMQ there is no guard and every call passes.
        """
        if self.guard is None:
            return False
        why = self.guard.call_refusal(self.pump.user_id, header.name, header.meta)
        if why is None:
            return False
        self.reject(identity, header.id, ErrorCode.FORBIDDEN, why)
        return True

    def push_forbidden(self, identity: bytes, header: wire.Header) -> bool:
        """Like :meth:`_call_forbidden`, for a PUSH to the topic ``header.name``."""
        if self.guard is None:
            return False
        why = self.guard.push_refusal(self.pump.user_id, header.name)
        if why is None:
            return False
        self.reject(identity, header.id, ErrorCode.FORBIDDEN, why)
        return True

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self.metrics.incr("dropped")
        self.throttle.log("dropped", logging.WARNING, "dropping a message from a peer: %s", why)

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        frames.insert(0, identity)
        # With the rest of this loop turn's answers (meshkit.transport), unless no other call is being
        # served (the call answered is still counted): then nothing else is coming, and it goes at once.
        # To a peer that sent a batch, they go out batched too (wire.FEATURE_BATCH).
        self.pump.send_soon(frames, self.inflight > 1, identity in self._batchers)

    def spawn(self, coro: Coroutine[Any, Any, None], on_done: Callable[[], None]) -> None:
        """Run ``coro`` as a task counted in flight; ``on_done`` runs when it ends, even unstarted."""
        self.inflight += 1
        self._report_inflight()
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, on_done))

    def _task_done(self, on_done: Callable[[], None], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.inflight -= 1
        self._report_inflight()
        on_done()
        if not self.inflight and not self._pushes.busy:
            self._idle.set()

    def call_ended(self, task: asyncio.Task[Any] | None) -> None:
        """A call's task ended (:mod:`meshkit.calls`): count it out of flight."""
        self._tasks.discard(task)
        self.inflight -= 1
        self._report_inflight()
        if not self.inflight and not self._pushes.busy:
            self._idle.set()

    def _report_inflight(self) -> None:
        if not self.metrics.enabled:
            return  # metrics off (the default): not even a clock read per call
        now = self.clock.now()
        if not self.inflight or now - self._inflight_reported >= INFLIGHT_REPORT_INTERVAL:
            self._inflight_reported = now
            self.metrics.inflight(self.inflight)

    def overloaded(self, identity: bytes, request_id: int, what: str, why: str) -> None:
        self.metrics.incr(f"rejected.{ErrorCode.OVERLOADED}")
        self.send(identity, wire.encode_error(request_id, ErrorCode.OVERLOADED, f"{what} refused: {why}"))

    # -- calls ----------------------------------------------------------------

    def _on_call(self, identity: bytes, header: wire.Header, header_frame: bytes, body: bytes) -> None:
        self.last_call = now = self.clock.now()
        if header.target != self.service:
            self.reject(identity, header.id, ErrorCode.UNKNOWN_SERVICE,
                         f"this instance serves {self.service!r}, not {clip(header.target)!r}")
            return
        if self.reserved is not None and header.name in self.reserved.methods:
            # Before the draining check and the budgets: a busy or draining instance still answers
            # (but only a caller the access policy lets call it).
            if not self._call_forbidden(identity, header):
                self.reserved.serve(identity, header, body, self.send)
            return
        framework = header.name.startswith(RESERVED_PREFIX)
        handler = (self._framework if framework else self.table.methods).get(header.name)
        if handler is None:
            self.reject(identity, header.id, ErrorCode.UNKNOWN_METHOD,
                         f"service {self.service!r} has no method {clip(header.name)!r}")
            return
        if self._call_forbidden(identity, header):
            return
        why, window = self.streams.admit(handler, header) if header.meta or handler.is_stream else (None, 0)
        if why is not None:
            self.reject(identity, header.id, ErrorCode.BAD_REQUEST, why)
            return
        if self.state != _UP and not framework:
            self.send(identity, wire.encode_error(header.id, ErrorCode.DRAINING, "instance is draining"))
            return
        # Refused before decoding when even the undecoded size does not fit.
        if not self._admit_call(identity, header.id, request_cost(header_frame, body, 0), take=False):
            return
        try:
            args, kwargs, containers = wire.decode_call(body, header.id, self.settings.max_body_containers)
        except ProtocolError as exc:
            self.reject(identity, header.id, exc.code, str(exc))
            return
        if header.timeout_ms == 0:
            self.send(identity, wire.encode_error(header.id, ErrorCode.DEADLINE_EXCEEDED, "deadline already passed"))
            return
        # Charged once decoded: what a body takes in memory is only known then.
        cost = request_cost(header_frame, body, containers)
        if not self._admit_call(identity, header.id, cost):
            return
        self.inflight += 1
        self._report_inflight()
        deadline = None if header.timeout_ms is None else now + header.timeout_ms / 1000.0
        # Its own bookkeeping runs at its end (no done-callback: one loop turn less per call).
        # loop.create_task, not asyncio.ensure_future: the latter's checks cost 0.8 us a call.
        entry = self.running.add(identity, header.id, handler.is_async)
        task = entry.task = asyncio.get_running_loop().create_task(
            run_call(self, identity, header, handler, args, kwargs, deadline, cost, entry, window))
        self._tasks.add(task)

    def _admit_call(self, identity: bytes, request_id: int, cost: int, take: bool = True) -> bool:
        """Charge a call to the quota (with ``take=False`` only check it fits), or answer ``overloaded``."""
        why = self.quota.refusal(identity, cost)
        if why is None:
            if take:
                self.quota.take(identity, cost)
            return True
        self.throttle.log("overloaded.call", logging.WARNING, "refusing calls: %s", why)
        self.overloaded(identity, request_id, "call", why)
        return False
