"""``Gateway``: the built-in service that holds client connections behind HAProxy.

Run it with ``meshkit run meshkit.gateway:Gateway``. Each instance

* listens for clients on ``bind_host`` and a port the kernel picks (or one in
  ``port_min..port_max``), and advertises ``host:port`` in its registry record
  under the listener name (``stratum`` by default), which is how HAProxy finds
  it;
* speaks newline-delimited JSON-RPC 2.0 (:mod:`meshkit.gateway.jsonrpc`): a
  request for ``SERVICE.METHOD`` becomes a mesh call with the configured
  deadline, carrying the connection id as metadata ``conn`` (backends read it
  with ``meshkit.current_call().connection_id``). While no instance of a known
  service is up, the call waits for one up to its deadline;
* subscribes to the configured topics (the record lists them, so publishers
  push here) and forwards each push to the clients subscribed to it,
  through one ordered queue bounded in bytes (:mod:`.fanout`): written in
  slices, so health checks are answered mid-fan-out, and acknowledged to
  the publisher once queued;
* takes pushes addressed to one connection on topic ``gateway.deliver``
  (:mod:`meshkit.gateway.push`): the message goes to that connection alone,
  and an unknown or closed connection is answered with
  :class:`~meshkit.errors.UnknownConnectionError`, never raised inside the gateway;
* writes in its listener's dialect (:mod:`meshkit.gateway.dialect`);
* with ``web_listener``, also serves HTTP (``POST /rpc``) and WebSocket
  (``/ws``) on a second port advertised under that name (:mod:`.web`); all
  three protocols run requests through one core (:mod:`.session`);
* keeps per-connection state in Redis (:mod:`meshkit.gateway.state`, its life in
  :mod:`meshkit.gateway.keeper`), created
  before a connection's first mesh call (again on a later call if that
  failed), restored if Redis loses it while the connection is open (a
  restarted Redis keeps nothing), deleted when the connection closes; and
  sweeps the state of dead gateways;
* enforces the limits in :class:`~meshkit.gateway.options.GatewayOptions`;
  a connection counts against ``max_connections`` until its socket is gone;
* answers HAProxy's health check (``mesh.ping``) from its event loop, so a
  hung gateway fails it within about a second;
* runs its idle sweep and its state sweep under :func:`meshkit.tasks.supervise`:
  an exception escaping either is logged and the loop restarted.

* reads each connection's PROXY header (:mod:`~meshkit.gateway.admission`)
  and passes the client's address to every mesh call as metadata
  ``client`` (``current_call().client_address``); refuses banned and
  over-limit addresses from memory, counts requests for the ban policy and
  shares its bans through Redis (:mod:`~meshkit.gateway.bans`);
* with ``gone_after``, tells (and maybe closes) the clients of a service
  that has had no instance for that long (:mod:`~meshkit.gateway.moving`);
* while it runs, raises the interpreter's youngest garbage-collector
  threshold to :data:`GC_YOUNG` (:class:`YoungGeneration`; put back at stop).

Draining (SIGTERM): the record says ``draining``, so HAProxy sends no new
connections; the listener closes a second later. Clients are asked to move
(``reconnect_method``) in waves over ``reconnect_window``; those that
honour it leave by themselves. Whoever is still there when ``drain_grace``
ends gets a ``shutting_down`` error, every request it had already sent is
answered, and the connection is closed
(:meth:`~meshkit.gateway.connection.Connection.finish`).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
from typing import Any

from ..config import Settings
from ..context import current_call
from ..errors import CallError, ClientClosedError, HandlerError
from ..observe.user import RequestSpan
from ..record import InstanceRecord
from ..service import Service
from ..tasks import Supervised, supervise
from ..untrusted import LogThrottle, clip
from . import dialect, jsonrpc, moving
from .admission import Guard, banned_error
from .bans import Ban, BanClientError, BanStore, BanSync, ClientFaultError
from .fanout import Fanout
from .jsonrpc import Request, RpcError
from .keeper import StateKeeper
from .listening import bind_host, candidate_ports
from .options import GatewayOptions
from .push import DELIVER_TOPIC, prepare
from .session import Session
from .state import ConnectionGoneError, ConnectionStore
from .tcp import TcpListener
from .web import WebListener

log = logging.getLogger("meshkit.gateway")

# After the record says "draining", HAProxy needs a moment (the sync
# process's reaction time) before it stops sending new connections here.
# Closing the listener earlier would reset connections HAProxy already sent.
_LISTEN_LINGER = 1.0
# A gateway missing from the registry this many record TTLs is dead (see .keeper).
DEAD_AFTER_TTLS = 3.0
# The garbage collector's youngest-generation threshold while a gateway runs (see YoungGeneration).
GC_YOUNG = 20_000
# Methods whose "is it streamed?" answer is kept (Gateway._streams); past it, all are forgotten.
_STREAMED_KEPT = 1024


class YoungGeneration:
    """The garbage collector's youngest-generation threshold, raised while a gateway runs.

    CPython collects its youngest generation once 700 more container objects
    are alive than at the last collection. A gateway under pipelined load has
    more than that in flight at any moment (each request's task, coroutine,
    futures, contexts and dicts), so every request still running is scanned by
    young collections until it is promoted, and the promoted ones set off full
    collections: measured with ``gc.callbacks`` and ``time.thread_time`` in a
    gateway under ``bench/edge.py``'s pipelined load, 19% of its CPU (1.3 s of
    6.9 s: full collections 0.78 s, young 0.30 s, middle 0.21 s). At 20,000
    the young collections run when that many objects more are alive, which
    requests that end do not add up to; reference cycles wait a little longer
    to be freed. The threshold is the interpreter's: it is put back at stop.
    """

    __slots__ = ("_before",)

    def __init__(self, before: tuple[int, int, int]) -> None:
        self._before = before

    @classmethod
    def raise_to(cls, young: int) -> YoungGeneration | None:
        """Raise the youngest generation's threshold to ``young`` (if higher); what restores it, or None."""
        before = gc.get_threshold()
        if young <= 0 or not gc.isenabled() or before[0] >= young:
            return None
        gc.set_threshold(young, before[1], before[2])
        return cls(before)

    def restore(self) -> None:
        """Put the threshold back as it was."""
        gc.set_threshold(*self._before)


class Gateway(Service):
    """Client connections in, mesh calls out, pushes back (see the module doc)."""

    name = "gateway"

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)
        self.options = GatewayOptions.from_settings(self.settings, self.name)
        # Topics come from configuration, not from a decorator.
        for pattern in self.options.topics:
            self.add_subscription(pattern, self._on_push)
        self.dialect = dialect.named(self.options.dialect)
        self.add_subscription(DELIVER_TOPIC, self._on_deliver)
        self.store = ConnectionStore(self.settings)
        self.connections: dict[str, Session] = {}
        self.address = ""
        self.tcp = TcpListener(self)
        self.web: WebListener | None = None
        self._ids = itertools.count(1)
        self._known_services: set[str] = set(self.options.services)
        self._streamed: dict[tuple[str, str], tuple[list[InstanceRecord], bool]] = {}  # see _streams
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._background: list[Supervised] = []
        self._gc: YoungGeneration | None = None  # the collector's threshold while it runs (GC_YOUNG)
        # Log lines clients (or a Redis outage) can cause, once per cause per interval.
        self._throttle = LogThrottle(log)
        self.conn_throttle = LogThrottle(logging.getLogger("meshkit.gateway.connection"))
        # Another gateway's state goes only once it has been missing well past
        # its record's TTL (a heartbeat late under load is not death).
        self.keeper = StateKeeper(self.store, self.instance_id, self._throttle, self._live_gateways,
                                  dead_after=DEAD_AFTER_TTLS * self.settings.ttl)
        self.guard = Guard(self.options)
        self.bans = BanStore(self.store.redis, self.settings.namespace)
        self._ban_sync = BanSync(self.bans, self.guard.bans, self.options.ban_sync, self._banned)
        self._client_faults = set(self.options.client_faults)
        # Topic pushes and deliveries, in one order, written in slices (see .fanout).
        self.fanout = Fanout(lambda: self.connections.values(), self._throttle)

    # -- lifecycle hooks ----------------------------------------------------------

    async def on_start(self) -> None:
        self._gc = YoungGeneration.raise_to(GC_YOUNG)
        port = await self.tcp.start(bind_host(self.settings), candidate_ports(self.settings))
        self.address = f"{self.settings.advertised_host}:{port}"
        self.advertise_listener(self.options.listener, self.address)
        self.registry.add_listener(self._note_services)
        self._note_services()
        self._background = [
            supervise("gateway-idle", self._expire_idle, logger=log),
            supervise("gateway-state-sweep", self._sweep_state, logger=log),
            supervise("gateway-ban-sync", self._ban_sync.run, logger=log, max_backoff=2.0),
            supervise("gateway-fanout", self.fanout.run, logger=log),
        ]
        if self.options.gone_after > 0:
            self._background.append(supervise("gateway-gone-watch", self._watch_gone, logger=log))
        log.info("listening for clients at %s (listener %r)", self.address, self.options.listener)
        if self.options.web_listener:
            self.web = WebListener(self)
            web_port = await self.web.start(bind_host(self.settings), candidate_ports(self.settings))
            web_address = f"{self.settings.advertised_host}:{web_port}"
            self.advertise_listener(self.options.web_listener, web_address)
            log.info("listening for HTTP and WebSocket clients at %s (listener %r)", web_address,
                     self.options.web_listener)

    async def stop(self, grace: float | None = None) -> None:
        """Stop as :meth:`Service.stop`; the grace defaults to the ``drain_grace`` option.

        That option is the gateway's one drain grace: its clients get it, and
        so does the work in flight.
        """
        await super().stop(self.options.drain_grace if grace is None else grace)

    async def on_drain(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        log.info("draining %d client connections (grace %.1fs)", len(self.connections), grace)
        await asyncio.sleep(min(_LISTEN_LINGER, grace))
        self.tcp.close()  # existing connections stay open
        if self.web is not None:
            self.web.stop_listening()  # HTTP requests now get 503: HAProxy retries them elsewhere
        mover: asyncio.Future[int] | None = None
        progress = moving.Progress()
        if self.options.reconnect_method and self.connections:
            # Oldest first; HAProxy already sends new connections elsewhere.
            window = min(self.options.reconnect_window, max(0.0, end - loop.time() - _LISTEN_LINGER))
            log.info("asking %d clients to reconnect elsewhere, over %.1fs", len(self.connections), window)
            mover = asyncio.ensure_future(moving.move_clients(list(self.connections.values()),
                                                              self.options, window, progress))
        try:
            await asyncio.wait_for(self._no_connections.wait(), max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            pass
        if mover is not None:
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)
            log.info("asked %d clients to reconnect elsewhere", progress.told)
        if self.connections:
            log.info("drain grace over: closing %d client connections", len(self.connections))
        await asyncio.gather(*(
            conn.finish(jsonrpc.SHUTTING_DOWN, "gateway is shutting down; reconnect",
                        self.options.request_timeout)
            for conn in list(self.connections.values())))
        if self.web is not None:
            # HTTP requests already running are answered (new ones got 503 since the listener closed).
            await self.web.wait_quiet(self.options.request_timeout + 1.0)

    async def on_stop(self) -> None:
        for loop in self._background:
            loop.cancel()
        await asyncio.gather(*(b.task for b in self._background if b.task is not None),
                             return_exceptions=True)
        for conn in list(self.connections.values()):
            conn.close(abort=True)
        if self.web is not None:
            await self.web.close()
        await self.keeper.wait()
        self.tcp.close()
        await self.store.aclose()
        if self._gc is not None:
            self._gc.restore()
            self._gc = None

    # -- accepting clients ------------------------------------------------------------

    def new_id(self) -> str:
        """A new connection id: ``<instance id>-<counter>`` (:mod:`.push` reads the instance from it)."""
        return f"{self.instance_id}-{next(self._ids):x}"

    def note_refusal(self, reason: str, message: str) -> None:
        """Log (throttled per ``reason``) why a client was refused."""
        self._throttle.log(reason, logging.WARNING, "%s", clip(message))

    def open_session(self, conn: Session) -> None:
        """Count ``conn`` among the connections (pushes reach it) until :meth:`close_session`."""
        self.connections[conn.id] = conn
        self._no_connections.clear()
        self.metrics.gateway_clients(len(self.connections))

    def close_session(self, conn: Session) -> None:
        """``conn`` is gone (its socket closed): uncount it and delete its state."""
        del self.connections[conn.id]
        if not self.connections:
            self._no_connections.set()
        self.metrics.gateway_clients(len(self.connections))
        self.keeper.closed(conn.id)

    # -- requests ---------------------------------------------------------------------

    def _note_services(self) -> None:
        if not self.options.services:
            self._known_services.update(self.registry.services())

    def _callable(self, service: str) -> bool:
        if service == self.name:
            return False
        if self.options.services:
            return service in self._known_services
        # Remembering every service ever seen is what lets a request wait
        # through a gap in which no instance of it is up.
        return service in self._known_services or bool(self.registry.instances(service))

    def _streams(self, service: str, method: str) -> bool:
        """Whether an instance of ``service`` in the registry view streams ``method``'s items.

        Kept per method until the registry's list of ``service``'s records
        changes (it makes a new one for every change): asked for every request.
        """
        records = self.registry.instances(service)
        known = self._streamed.get((service, method))
        if known is not None and known[0] is records:
            return known[1]
        streams = any(method in r.streams for r in records)
        if len(method) <= self.settings.max_name_length:  # client text: only names a call may have
            if len(self._streamed) >= _STREAMED_KEPT:
                self._streamed.clear()  # and a bounded number of them
            self._streamed[(service, method)] = (records, streams)
        return streams

    async def route(self, conn: Session, request: Request) -> Any:
        """Run one client request as a mesh call; raise :class:`RpcError` on failure."""
        target = jsonrpc.split_method(request.method)
        if target is None:
            self.metrics.gateway_rejected("method_not_found")
            raise RpcError(jsonrpc.METHOD_NOT_FOUND,
                           f"method must be SERVICE.METHOD, got {clip(request.method)!r}")
        service, method = target
        if not self._callable(service):
            self.metrics.gateway_rejected("method_not_found")
            raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"unknown service {clip(service)!r}")
        if conn.stateful:
            await self.keeper.ensure(conn)
        conn.services_used.add(service)
        params = request.params
        args = params if isinstance(params, list) else []
        kwargs = params if isinstance(params, dict) else {}
        # The request's span (docs/observability.md): a child of the client's traceparent, if sent.
        # RequestSpan, not self.span(): the same span for less CPU (see its doc).
        span = RequestSpan(self.observer, request.method, {"conn": conn.id}, traceparent=request.traceparent)
        try:
            with span:
                meta = {"conn": conn.id, "client": conn.peer}
                if self._streams(service, method):  # items as notifications
                    result = await conn.relay_stream(request.id, self.client.stream(
                        service, method, *args, timeout=self.options.request_timeout, meta=meta, **kwargs))
                else:
                    result = await self.client.call(service, method, args, kwargs,
                                                    timeout=self.options.request_timeout, wait=True, meta=meta)
        except CallError as exc:
            span.set_status(exc.code)
            # Told apart by wire code (the classes register theirs), never by class name.
            if isinstance(exc, ConnectionGoneError):
                self.keeper.lost(conn)
            code, message, data = jsonrpc.error_for(exc)
            if isinstance(exc, BanClientError) and conn.address is not None:
                self.ban(conn.address, clip(exc.message, 200))
            else:
                self.judge(conn, "client" if self._client_fault(exc) else "ok")
            raise RpcError(code, message, {**data, "trace_id": span.trace_id} if request.want_trace else data) from None
        except ClientClosedError:
            raise RpcError(jsonrpc.SHUTTING_DOWN, "gateway is shutting down") from None
        except (TypeError, ValueError, OverflowError) as exc:
            # The mesh encodes with MessagePack, which refuses e.g. integers over 64 bits.
            raise RpcError(jsonrpc.INVALID_PARAMS,
                           f"params cannot be sent: {clip(str(exc))}") from None
        self.judge(conn, "ok")
        return result

    # -- limits and bans ----------------------------------------------------------------

    def _client_fault(self, exc: CallError) -> bool:
        """Whether a backend's error is the client's fault: by its code (or a plain exception's type)."""
        if isinstance(exc, ClientFaultError) or exc.code in self._client_faults:
            return True
        return isinstance(exc, HandlerError) and exc.remote_type in self._client_faults

    def judge(self, conn: Session, kind: str) -> None:
        """Count one request of ``conn`` for the ban policy (``ok``, ``invalid``, ``client``)."""
        self.judge_address(conn.address, kind)

    def judge_address(self, address: str | None, kind: str) -> None:
        """Count one request from ``address`` for the ban policy; ban it when the policy says so."""
        if self.guard.judge(address, kind) and address is not None:
            self.ban(address, f"at least {self.options.ban_ratio:g} of "
                     f"{self.options.ban_min_requests} requests were bad")

    def ban(self, address: str, reason: str) -> Ban:
        """Ban ``address`` for ``ban_time`` here at once, close its connections, and share the ban.

        The ban is written to Redis in the background (bounded; with Redis
        away it holds in this gateway only, and is lost at its restart).
        """
        ban = self.guard.ban_here(address, reason)
        # Throttled: an attack from many addresses must not flood the log (the count is kept).
        self._throttle.log("ban", logging.WARNING, "banning %s for %gs: %s", address,
                           self.options.ban_time, clip(reason))
        self.metrics.gateway_rejected("ban")
        self._banned(ban)
        self.keeper.spawn(self.bans.add(address, self.options.ban_time, reason), "sharing a ban")
        return ban

    def _banned(self, ban: Ban) -> None:
        """Close every connection from a newly banned address, with the ``banned`` error."""
        line = self.dialect.error_line(None, *banned_error(ban))
        for conn in list(self.connections.values()):
            if conn.address == ban.address and not conn.closed:
                conn.send(line)
                conn.close_for(jsonrpc.BANNED)

    async def _watch_gone(self) -> None:
        await moving.watch_gone(self.options, lambda: list(self.connections.values()),
                                lambda service: len(self.registry.instances(service)))

    # -- pushes -------------------------------------------------------------------------

    async def _on_push(self, payload: Any) -> None:
        ctx = current_call()
        topic = ctx.name if ctx is not None else ""
        try:
            line = self.dialect.notification_line(topic, payload)
        except jsonrpc.UNENCODABLE as exc:
            self._throttle.log("push_unencodable", logging.WARNING,
                               "push to %s cannot be sent as JSON: %s", clip(topic), clip(str(exc)))
            return
        # Acknowledged once queued (the fan-out may take longer than the
        # publisher waits); a full queue answers ``overloaded``.
        self.fanout.accept(line, topic=topic)

    async def _on_deliver(self, payload: Any) -> None:
        """A push addressed to one connection: :func:`.push.prepare`, then queued behind earlier pushes."""
        prepared = prepare(payload, self.connections, self.options, self.dialect, self.instance_id)
        if prepared is not None:
            self.fanout.accept(prepared[1], target=prepared[0])

    # -- background ---------------------------------------------------------------------

    async def _expire_idle(self) -> None:
        """Close idle connections, forever (supervised: restarted if it raises)."""
        timeout = self.options.idle_timeout
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, max(0.05, timeout / 4)))
            now = loop.time()
            for conn in list(self.connections.values()):
                if conn.idle(now):
                    self.metrics.gateway_rejected("idle_timeout")
                    self._throttle.log("idle_timeout", logging.INFO,
                                       "closing idle connection %s (%s)", conn.id, conn.peer)
                    conn.close(jsonrpc.IDLE_TIMEOUT, f"nothing received for {timeout:g}s")

    async def _sweep_state(self) -> None:
        """Sweep every ``ttl`` seconds, forever (supervised: restarted if it raises)."""
        while True:
            try:
                await self.sweep_state()
            except Exception as exc:  # Redis away, or bad data in it: the next sweep tries again
                self._throttle.log("state_sweep_failed", logging.WARNING,
                                   "connection state sweep failed: %s", clip(str(exc)))
            await asyncio.sleep(self.settings.ttl)

    async def sweep_state(self) -> int:
        """One sweep of the connections' Redis state (:meth:`StateKeeper.sweep`); how many were deleted."""
        return await self.keeper.sweep(self.connections)

    async def _live_gateways(self) -> set[str]:
        return {r.instance_id for r in await self.registry.scan()}
