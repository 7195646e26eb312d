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
  push here) and forwards each push to the clients subscribed to it;
* takes pushes addressed to one connection on topic ``gateway.deliver``
  (:mod:`meshkit.gateway.push`): the message goes to that connection alone,
  and an unknown or closed connection is answered with
  :class:`~meshkit.errors.UnknownConnectionError`, never raised inside the gateway;
* writes in its listener's dialect (:mod:`meshkit.gateway.dialect`);
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
  that has had no instance for that long (:mod:`~meshkit.gateway.moving`).

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
import itertools
import logging
import random
import socket
import time
from typing import Any

from ..config import Settings
from ..context import current_call
from ..errors import CallError, ClientClosedError, HandlerError
from ..service import Service
from ..tasks import Supervised, supervise
from ..untrusted import LogThrottle, clip
from . import dialect, jsonrpc, moving
from .admission import Guard, Refusal, banned_error, client_of, read_proxy_header
from .bans import Ban, BanClientError, BanStore, BanSync
from .connection import Connection
from .jsonrpc import Request, RpcError
from .keeper import StateKeeper
from .options import GatewayOptions
from .proxy_protocol import ProxyHeaderError
from .push import DELIVER_TOPIC, deliver
from .state import ConnectionGoneError, ConnectionStore

log = logging.getLogger("meshkit.gateway")

# After the record says "draining", HAProxy needs a moment (the sync
# process's reaction time) before it stops sending new connections here.
# Closing the listener earlier would reset connections HAProxy already sent.
_LISTEN_LINGER = 1.0


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
        self.connections: dict[str, Connection] = {}
        self.address = ""
        self._listener: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._known_services: set[str] = set(self.options.services)
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._background: list[Supervised] = []
        # Log lines clients (or a Redis outage) can cause, once per cause per interval.
        self._throttle = LogThrottle(log)
        self._conn_throttle = LogThrottle(logging.getLogger("meshkit.gateway.connection"))
        self.keeper = StateKeeper(self.store, self.instance_id, self._throttle, self._live_gateways)
        self.guard = Guard(self.options)
        self.bans = BanStore(self.store.redis, self.settings.namespace)
        self._ban_sync = BanSync(self.bans, self.guard.bans, self.options.ban_sync, self._banned)
        self._client_faults = {*self.options.client_faults, BanClientError.__name__}

    # -- lifecycle hooks ----------------------------------------------------------

    async def on_start(self) -> None:
        self._listener = await self._listen()
        port = self._listener.sockets[0].getsockname()[1]
        self.address = f"{self.settings.advertised_host}:{port}"
        self.advertise_listener(self.options.listener, self.address)
        self.registry.add_listener(self._note_services)
        self._note_services()
        self._background = [
            supervise("gateway-idle", self._expire_idle, logger=log),
            supervise("gateway-state-sweep", self._sweep_state, logger=log),
            supervise("gateway-ban-sync", self._ban_sync.run, logger=log, max_backoff=2.0),
        ]
        if self.options.gone_after > 0:
            self._background.append(supervise("gateway-gone-watch", self._watch_gone, logger=log))
        log.info("listening for clients at %s (listener %r)", self.address, self.options.listener)

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
        if self._listener is not None:
            self._listener.close()  # existing connections stay open
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

    async def on_stop(self) -> None:
        for loop in self._background:
            loop.cancel()
        await asyncio.gather(*(b.task for b in self._background if b.task is not None),
                             return_exceptions=True)
        for conn in list(self.connections.values()):
            conn.close(abort=True)
        await self.keeper.wait()
        if self._listener is not None:
            self._listener.close()
        await self.store.aclose()

    # -- accepting clients ------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        host = self.settings.bind_host
        if host in ("", "*"):
            host = "0.0.0.0"
        low, high = self.settings.port_min, self.settings.port_max
        ports = random.sample(range(low, high + 1), min(200, high - low + 1)) if low else [0]
        for port in ports:
            try:
                return await asyncio.start_server(self._on_client, host, port,
                                                  family=socket.AF_INET if ":" not in host else 0,
                                                  backlog=1024, reuse_address=True)
            except OSError:
                if port == ports[-1]:
                    raise
        raise OSError("no port to listen on")  # unreachable: ports is never empty

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = f"{self.instance_id}-{next(self._ids):x}"
        accepted = time.monotonic()
        wait = self.options.proxy_timeout
        if self.options.proxy_protocol == "accept" and self.options.idle_timeout > 0:
            # A silent client may have no header at all: do not hold it past its idle timeout.
            wait = min(wait, self.options.idle_timeout)
        try:
            header, initial = await read_proxy_header(reader, self.options.proxy_protocol, wait)
        except (ProxyHeaderError, ConnectionError, OSError) as exc:
            self.metrics.gateway_rejected("proxy_header")
            self._throttle.log("proxy_header", logging.WARNING, "closing %s from %s: %s", conn_id,
                               clip(writer.get_extra_info("peername")), clip(str(exc)))
            dropped = Connection(conn_id, reader, writer, options=self.options, call=self._route,
                                 metrics=self.metrics)
            dropped.close(abort=True)  # a reset: it never spoke our protocol
            await dropped.wait_closed()
            return
        peer, address = client_of(header, writer.get_extra_info("peername"))
        conn = Connection(conn_id, reader, writer, options=self.options, call=self._route,
                          metrics=self.metrics, gateway_id=self.instance_id,
                          throttle=self._conn_throttle, initial=initial, peer=peer, address=address,
                          request_bucket=self.guard.request_bucket(address), judge=self._judge)
        conn.last_active = accepted  # waiting for its header counts as idle time
        if len(self.connections) >= self.options.max_connections:
            # Connections that are closing count too, until their socket is gone.
            await self._refuse(conn, "too_many_connections", (
                jsonrpc.TOO_MANY_CONNECTIONS,
                f"gateway full ({self.options.max_connections} connections); retry later", {}))
            return
        refusal = self.guard.admit(address)
        if refusal is not None:
            await self._refuse(conn, jsonrpc.REASONS[refusal[0]], refusal)
            return
        self.connections[conn_id] = conn
        self._no_connections.clear()
        self.metrics.gateway_clients(len(self.connections))
        try:
            await conn.serve()
        finally:
            self.guard.release(address)
            del self.connections[conn_id]
            if not self.connections:
                self._no_connections.set()
            self.metrics.gateway_clients(len(self.connections))
            self.keeper.closed(conn_id)

    async def _refuse(self, conn: Connection, reason: str, error: Refusal) -> None:
        self.metrics.gateway_rejected(reason)
        self._throttle.log(reason, logging.WARNING, "refusing %s: %s", conn.peer, error[1])
        conn.send(self.dialect.error_line(None, *error))
        conn.close()
        await conn.wait_closed()

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

    async def _route(self, conn: Connection, request: Request) -> Any:
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
        await self.keeper.ensure(conn)
        conn.services_used.add(service)
        params = request.params
        args = params if isinstance(params, list) else []
        kwargs = params if isinstance(params, dict) else {}
        # The request's span (docs/observability.md): a child of the client's traceparent, if sent.
        span = self.span(request.method, traceparent=request.traceparent, kind="server", conn=conn.id)
        try:
            with span:
                result = await self.client.call(service, method, args, kwargs,
                                                timeout=self.options.request_timeout, wait=True,
                                                meta={"conn": conn.id, "client": conn.peer})
        except CallError as exc:
            span.set_status(exc.code)
            remote_type = exc.remote_type if isinstance(exc, HandlerError) else ""
            if remote_type == ConnectionGoneError.__name__:
                self.keeper.lost(conn)
            code, message, data = jsonrpc.error_for(exc)
            if remote_type == BanClientError.__name__ and conn.address is not None:
                self.ban(conn.address, clip(getattr(exc, "message", ""), 200))
            else:
                self._judge(conn, "client" if remote_type in self._client_faults else "ok")
            raise RpcError(code, message, {**data, "trace_id": span.trace_id} if request.want_trace else data) from None
        except ClientClosedError:
            raise RpcError(jsonrpc.SHUTTING_DOWN, "gateway is shutting down") from None
        except (TypeError, ValueError, OverflowError) as exc:
            # The mesh encodes with MessagePack, which refuses e.g. integers over 64 bits.
            raise RpcError(jsonrpc.INVALID_PARAMS,
                           f"params cannot be sent: {clip(str(exc))}") from None
        self._judge(conn, "ok")
        return result

    # -- limits and bans ----------------------------------------------------------------

    def _judge(self, conn: Connection, kind: str) -> None:
        if self.guard.judge(conn.address, kind) and conn.address is not None:
            self.ban(conn.address, f"at least {self.options.ban_ratio:g} of "
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
                conn.close()

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
        for conn in list(self.connections.values()):
            conn.push(topic, line)

    async def _on_deliver(self, payload: Any) -> None:
        """A push addressed to one connection: :func:`.push.deliver` (refusals go back to the sender)."""
        deliver(payload, self.connections, self.options, self.dialect, self.instance_id)

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
