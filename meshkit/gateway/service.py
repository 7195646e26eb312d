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
* keeps per-connection state in Redis (:mod:`meshkit.gateway.state`), created
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

Draining (SIGTERM): the record says ``draining``, so HAProxy sends no new
connections; the listener closes a second later. Existing clients keep
working until they disconnect or ``drain_grace`` ends; then each gets a
``shutting_down`` error (its cue to reconnect), every request it had already
sent is answered, and the connection is closed
(:meth:`~meshkit.gateway.connection.Connection.finish`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
from typing import Any

from ..config import Settings
from ..context import current_call
from ..errors import CallError, ClientClosedError, HandlerError
from ..service import Service
from ..tasks import Supervised, supervise
from ..untrusted import LogThrottle, clip
from . import jsonrpc
from .connection import Connection
from .jsonrpc import Request, RpcError
from .options import GatewayOptions
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
        self._state_tasks: set[asyncio.Task[None]] = set()
        # conn id -> the latest task creating its state (True once created).
        # An entry means "this connection has state": closing deletes it, the
        # sweep restores it. Connections that never made a mesh call have none.
        self._state_opening: dict[str, asyncio.Task[bool]] = {}
        self._suspects: set[str] = set()  # gateways missing from the registry at the last sweep

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
        ]
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
        try:
            await asyncio.wait_for(self._no_connections.wait(), max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            pass
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
        if self._state_tasks:
            await asyncio.wait(self._state_tasks, timeout=2.0)
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
        conn = Connection(conn_id, reader, writer, options=self.options, call=self._route,
                          metrics=self.metrics, gateway_id=self.instance_id,
                          throttle=self._conn_throttle)
        if len(self.connections) >= self.options.max_connections:
            # Connections that are closing count too, until their socket is gone.
            self.metrics.gateway_rejected("too_many_connections")
            self._throttle.log("too_many_connections", logging.WARNING,
                               "refusing %s: already %d connections", conn.peer, len(self.connections))
            conn.close(jsonrpc.TOO_MANY_CONNECTIONS,
                       f"gateway full ({self.options.max_connections} connections); retry later")
            await conn.wait_closed()
            return
        self.connections[conn_id] = conn
        self._no_connections.clear()
        self.metrics.gateway_clients(len(self.connections))
        try:
            await conn.serve()
        finally:
            del self.connections[conn_id]
            if not self.connections:
                self._no_connections.set()
            self.metrics.gateway_clients(len(self.connections))
            opening = self._state_opening.pop(conn_id, None)
            if opening is not None:
                self._spawn_state_task(self._close_state(conn_id, opening))

    async def _ensure_state(self, conn: Connection) -> None:
        """Create the connection's Redis state before its mesh call, unless it was created.

        Not at accept: HAProxy's health checks connect every half second and
        never send a request, and they should cost no Redis writes. A create
        that failed (Redis away) is not remembered as done: the connection's
        next request tries again. Never raises: the call goes ahead without
        state, and a backend that needs it gets ``ConnectionGoneError``.
        """
        opening = self._state_opening.get(conn.id)
        if opening is None or _failed(opening):
            if conn.closed:
                return  # its state would outlive it
            opening = self._open_state(conn)
        if not opening.done():
            await asyncio.shield(opening)  # a cancelled request must not cancel the write

    def _open_state(self, conn: Connection) -> asyncio.Task[bool]:
        """Start creating ``conn``'s state (idempotent) and make that its latest task."""
        task = asyncio.create_task(self._create_state(conn.id, conn.peer),
                                   name=f"gateway-state-{conn.id}")
        self._state_opening[conn.id] = task
        return task

    async def _create_state(self, conn_id: str, peer: str) -> bool:
        try:
            # Bounded: with Redis away, a request waits at most this long for it.
            await asyncio.wait_for(self.store.open(conn_id, self.instance_id, peer), 1.0)
        except Exception as exc:
            self._throttle.log("state_create_failed", logging.WARNING,
                               "creating the state of connection %s failed (tried again on its "
                               "next request): %s", conn_id, clip(str(exc)))
            return False
        return True

    def _state_lost(self, conn: Connection) -> None:
        """A backend found no state for ``conn``, which is open: create it again now.

        Redis lost it (a restart) or a sweep took this gateway for dead. The
        failed request is not retried (it may not be idempotent); the next one
        finds the state back, without waiting for the periodic sweep.
        """
        opening = self._state_opening.get(conn.id)
        if conn.closed or (opening is not None and not opening.done()):
            return  # closing, or being created already
        self._throttle.log("state_lost", logging.WARNING,
                           "connection %s lost its state; creating it again", conn.id)
        self._open_state(conn)

    async def _close_state(self, conn_id: str, opening: asyncio.Task[bool]) -> None:
        # Even after a failed create: a create that timed out may still have landed.
        await opening  # never deletes before the create landed
        await self.store.close(conn_id, self.instance_id)

    def _spawn_state_task(self, coro: Any) -> None:
        task = asyncio.create_task(_logged(coro, "deleting connection state", self._throttle))
        self._state_tasks.add(task)
        task.add_done_callback(self._state_tasks.discard)

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
        await self._ensure_state(conn)
        params = request.params
        args = params if isinstance(params, list) else []
        kwargs = params if isinstance(params, dict) else {}
        try:
            return await self.client.call(service, method, args, kwargs,
                                          timeout=self.options.request_timeout, wait=True,
                                          meta={"conn": conn.id})
        except CallError as exc:
            if isinstance(exc, HandlerError) and exc.remote_type == ConnectionGoneError.__name__:
                self._state_lost(conn)
            code, message, data = jsonrpc.error_for(exc)
            raise RpcError(code, message, data) from None
        except ClientClosedError:
            raise RpcError(jsonrpc.SHUTTING_DOWN, "gateway is shutting down") from None
        except (TypeError, ValueError, OverflowError) as exc:
            # The mesh encodes with MessagePack, which refuses e.g. integers over 64 bits.
            raise RpcError(jsonrpc.INVALID_PARAMS,
                           f"params cannot be sent: {clip(str(exc))}") from None

    # -- pushes -------------------------------------------------------------------------

    async def _on_push(self, payload: Any) -> None:
        ctx = current_call()
        topic = ctx.name if ctx is not None else ""
        try:
            line = jsonrpc.notification_line(topic, payload)
        except jsonrpc.UNENCODABLE as exc:
            self._throttle.log("push_unencodable", logging.WARNING,
                               "push to %s cannot be sent as JSON: %s", clip(topic), clip(str(exc)))
            return
        for conn in list(self.connections.values()):
            conn.push(topic, line)

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
        """One sweep: restore our open connections' lost state; delete the state of dead
        gateways and of our own closed connections.

        Restoring recreates the state of each open connection that has state
        (it made a mesh call) but whose hash is missing, as after a Redis
        restart; the application's fields are gone with it. A gateway counts
        as dead when it is missing from the registry on two sweeps in a row
        (see :mod:`meshkit.gateway.state`). Returns how many connections'
        state was deleted.
        """
        await self._restore_state()
        live = {r.instance_id for r in await self.registry.scan()}
        live.add(self.instance_id)
        removed = 0
        missing = await self.store.gateways() - live
        for gateway_id in missing & self._suspects:
            count = await self.store.drop_gateway(gateway_id)
            removed += count
            log.info("removed state of %d connections of dead gateway %s", count, clip(gateway_id))
        self._suspects = missing - self._suspects  # dropped ones are gone; the rest wait a sweep
        # After the restore: a connection that closed meanwhile may have had
        # its state restored after its delete; this removes it again.
        removed += await self.store.reconcile(self.instance_id, self.connections)
        return removed

    async def _restore_state(self) -> None:
        peers: dict[str, str] = {}
        for conn_id, opening in self._state_opening.items():
            conn = self.connections.get(conn_id)
            # A create in progress will land by itself.
            if opening.done() and conn is not None and not conn.closed:
                peers[conn_id] = conn.peer
        if not peers:
            return
        restored = await self.store.restore(self.instance_id, peers)
        if restored:
            log.warning("restored the state of %d open connections (Redis had lost it)",
                        len(restored))


def _failed(task: asyncio.Task[bool]) -> bool:
    """Whether a state-creating task ended without creating the state."""
    return task.done() and (task.cancelled() or not task.result())


async def _logged(coro: Any, what: str, throttle: LogThrottle, timeout: float = 2.0) -> None:
    """Await a Redis state operation, bounded; failures are logged, never raised.

    A gateway keeps serving while Redis is away: only the state is missing
    (backends get ``ConnectionGoneError``), and the sweep deletes leftovers.
    """
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as exc:
        throttle.log(what, logging.WARNING, "%s failed: %s", what, clip(str(exc)))
