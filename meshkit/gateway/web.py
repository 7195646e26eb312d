"""The gateway's HTTP and WebSocket listener (aiohttp), beside its TCP listener.

With ``web_listener`` set, a gateway also listens on a second kernel-chosen
port and advertises it under that listener name (HAProxy's ``mode http``
frontends route to it). Every connection starts with its PROXY header
(:mod:`.proxy_front`); the client address it names is what limits, bans and
``current_call().client_address`` see, as on TCP.

Routes (``docs/gateway.md``):

``POST <http_path>`` (``/rpc``)
    One JSON-RPC request or batch per request body (``Content-Type:
    application/json``). **200** with the answer for every JSON-RPC answer,
    errors included; **204** when the body held only notifications.
    HTTP-level failures: **408** body not received within
    ``request_timeout``, **413** body over ``max_line`` bytes, **415** wrong
    content type, **403** banned address (``Retry-After``: until the ban
    ends), **429** over ``request_rate`` for the address (``Retry-After``),
    **503** gateway full or stopping (``Retry-After: 1``; HAProxy retries
    it on another gateway). Each body is a :class:`HttpExchange`: the same
    semantics as a connection's line (:class:`~.session.Session`), no
    connection state in Redis and no pushes (``mesh.subscribe`` is refused:
    subscribe over WebSocket). A W3C ``traceparent`` header is continued
    (a malformed one starts a new trace) and every mesh call carries it;
    the answer has ``traceparent`` (the gateway's span) and ``X-Trace-Id``.
``GET <ws_path>`` (``/ws``)
    A WebSocket upgrade: a :class:`~.websocket.WsConnection`, with the
    limits, bans and pushes of a TCP connection. Refused before the upgrade
    as a POST is (403, 429, 503 with ``Retry-After``).
``GET <health_path>`` (``/health``)
    ``200 pong`` from the gateway's event loop (a hung gateway cannot
    answer); ``503 draining`` once it is stopping. HAProxy's ``http-check``.

CORS: with ``cors_origins`` (``*`` or a list), answers carry
``Access-Control-Allow-Origin`` for a matching ``Origin`` and ``OPTIONS``
preflights are answered; without, no CORS header is sent.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..context import CallContext, reset_current, set_current
from ..trace import TraceContext
from . import jsonrpc
from .admission import banned_error
from .jsonrpc import Request, RpcError
from .limits import AddressBuckets
from .listening import Host
from .proxy_front import Clients, ProxyFront, client_for
from .session import Session
from .websocket import WsConnection

_JSON_TYPES = ("application/json", "application/json-rpc")


class HttpExchange(Session):
    """One HTTP request body: a session that lives for one answer, with no state and no pushes."""

    stateful = False

    def send(self, line: bytes) -> bool:
        return False  # nothing but the answer goes back over HTTP

    def close(self, code: int | None = None, message: str = "", *, abort: bool = False) -> None:
        self.closed = True
        self.cancel_work()

    async def wait_closed(self) -> None:
        return None

    async def finish(self, code: int, message: str, wait: float, linger: float = 1.0) -> None:
        await self.wait_quiet(wait)

    def _builtin(self, request: Request) -> Any:
        if request.method in ("mesh.subscribe", "mesh.unsubscribe"):
            raise RpcError(jsonrpc.INVALID_REQUEST,
                           "subscriptions need a connection: use the WebSocket listener")
        return super()._builtin(request)


class WebListener:
    """The aiohttp server of one gateway (see the module doc)."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self.options = gateway.options
        self.clients: Clients = weakref.WeakKeyDictionary()
        self.buckets = AddressBuckets(self.options.request_rate, self.options.request_burst,
                                      self.options.max_addresses)
        self.in_flight = 0  # HTTP requests being answered
        self._quiet = asyncio.Event()  # set while no HTTP request is being answered
        self._quiet.set()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, ports: list[int]) -> int:
        """Listen on the first of ``ports`` that is free (0: the kernel's choice); return the port."""
        app = web.Application(client_max_size=self.options.max_line)
        app.router.add_post(self.options.http_path, self._post)
        app.router.add_route("OPTIONS", self.options.http_path, self._preflight)
        app.router.add_get(self.options.ws_path, self._websocket)
        app.router.add_get(self.options.health_path, self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=self.options.close_timeout)
        await self._runner.setup()
        factory: Callable[[], asyncio.Protocol] = self._runner.server  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        for port in ports:
            try:
                self._server = await loop.create_server(
                    lambda: ProxyFront(lambda _client: factory(), self.clients, self.options.proxy_protocol,
                                       self.options.proxy_timeout, self._proxy_refused),
                    host, port, family=socket.AF_INET if ":" not in host else 0,
                    backlog=1024, reuse_address=True)
                break
            except OSError:
                if port == ports[-1]:
                    raise
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        """Take no new connections; requests on open ones are answered 503 (retried elsewhere)."""
        self.stopping = True
        if self._server is not None:
            self._server.close()

    async def wait_quiet(self, timeout: float) -> None:
        """Return once no HTTP request is being answered, or after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._quiet.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        """Close every HTTP connection (answers in flight get ``close_timeout`` s)."""
        self.stop_listening()
        if self._runner is not None:
            await self._runner.cleanup()

    def _proxy_refused(self, reason: str) -> None:
        self.gateway.metrics.gateway_rejected("proxy_header")
        self.gateway.note_refusal("proxy_header", f"closing a web connection: {reason}")

    # -- HTTP ---------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self.stopping:
            return web.Response(status=503, text="draining", headers={"Retry-After": "1"})
        return web.Response(text="pong")

    async def _preflight(self, request: web.Request) -> web.Response:
        headers = self._cors(request)
        if headers:
            headers.update({"Access-Control-Allow-Methods": "POST, OPTIONS",
                            "Access-Control-Allow-Headers": "Content-Type, traceparent",
                            "Access-Control-Max-Age": "600"})
        return web.Response(status=204, headers=headers)

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        allowed = self.options.cors_origins
        if not origin or not allowed:
            return {}
        if "*" in allowed:
            return {"Access-Control-Allow-Origin": "*",
                    "Access-Control-Expose-Headers": "traceparent, X-Trace-Id, Retry-After"}
        if origin in allowed:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                    "Access-Control-Expose-Headers": "traceparent, X-Trace-Id, Retry-After"}
        return {}

    def _refusal(self, request: web.Request, address: str | None, *,
                 rate: bool) -> web.Response | None:
        """The HTTP answer refusing this request before it runs, or None to go ahead."""
        gateway = self.gateway
        if self.stopping:
            return self._error(request, 503, jsonrpc.SHUTTING_DOWN,
                               "gateway is shutting down; retry", retry_after=1)
        if self.in_flight + len(gateway.connections) >= self.options.max_connections:
            gateway.metrics.gateway_rejected("too_many_connections")
            return self._error(request, 503, jsonrpc.TOO_MANY_CONNECTIONS,
                               "gateway full; retry later", retry_after=1)
        if not gateway.guard.limited(address):
            return None
        assert address is not None
        ban = gateway.guard.bans.get(address, time.time())
        if ban is not None:
            gateway.metrics.gateway_rejected("banned")
            code, message, data = banned_error(ban)
            return self._error(request, 403, code, message, data,
                               retry_after=max(1, math.ceil(ban.until - time.time())))
        bucket = self.buckets.bucket(address, time.monotonic()) if rate else None
        if bucket is not None and not bucket.ready(time.monotonic()):
            gateway.metrics.gateway_rejected("rate_limited")
            return self._error(request, 429, jsonrpc.RATE_LIMITED,
                               f"more than {self.options.request_rate:g} requests per second "
                               "from this address; not run",
                               retry_after=max(1, math.ceil(1 / self.options.request_rate)))
        return None

    def _error(self, request: web.Request, status: int, code: int, message: str,
               data: dict[str, Any] | None = None, *, retry_after: int | None = None) -> web.Response:
        headers = self._cors(request)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        body = self.gateway.dialect.error_line(None, code, message, data)
        return web.Response(status=status, body=body, content_type="application/json",
                            headers=headers)

    async def _post(self, request: web.Request) -> web.Response:
        peer, address = client_for(self.clients, request.transport)
        refused = self._refusal(request, address, rate=True)
        if refused is not None:
            return refused
        if request.content_type not in _JSON_TYPES:
            self.gateway.metrics.gateway_rejected("content_type")
            return self._error(request, 415, jsonrpc.INVALID_REQUEST,
                               "Content-Type must be application/json")
        self.in_flight += 1
        self._quiet.clear()
        try:
            try:
                # A client sending its body slowly must not hold a slot for ever.
                body = await asyncio.wait_for(request.read(), self.options.request_timeout)
            except asyncio.TimeoutError:
                self.gateway.metrics.gateway_rejected("slow_body")
                return self._error(request, 408, jsonrpc.INVALID_REQUEST,
                                   f"body not received within {self.options.request_timeout:g}s")
            except web.HTTPRequestEntityTooLarge:
                self.gateway.metrics.gateway_rejected("line_too_long")
                self.gateway.judge_address(address, "invalid")
                return self._error(request, 413, jsonrpc.LINE_TOO_LONG,
                                   f"body longer than {self.options.max_line} bytes")
            return await self._answer(request, body, peer, address)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._quiet.set()

    async def _answer(self, request: web.Request, body: bytes, peer: str,
                      address: str | None) -> web.Response:
        gateway = self.gateway
        trace = TraceContext.from_traceparent(request.headers.get("traceparent"))
        # Items spend the address's tokens one by one, as a connection's do.
        bucket = (self.buckets.bucket(address, time.monotonic())
                  if gateway.guard.limited(address) and address is not None else None)
        exchange = HttpExchange(gateway.new_id(), options=self.options, call=gateway.route,
                                metrics=gateway.metrics, gateway_id=gateway.instance_id,
                                throttle=gateway.conn_throttle, peer=peer, address=address,
                                request_bucket=bucket, judge=gateway.judge)
        answered: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if not body.strip():
            answered.set_result(exchange.error_line(jsonrpc.PARSE_ERROR, "empty body"))
        else:
            # The mesh calls' tasks copy this context: they carry the client's trace.
            token = set_current(CallContext("gateway", "http", trace))
            try:
                exchange.handle_line(body, answered.set_result)
            finally:
                reset_current(token)
        try:
            line = await answered
        except asyncio.CancelledError:
            exchange.close()  # the client went away: so do its calls
            raise
        headers = self._cors(request)
        headers["traceparent"] = trace.traceparent()
        headers["X-Trace-Id"] = trace.trace_id
        if line is None:
            return web.Response(status=204, headers=headers)
        return web.Response(body=line, content_type="application/json", headers=headers)

    # -- WebSocket ------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        gateway = self.gateway
        peer, address = client_for(self.clients, request.transport)
        refused = self._refusal(request, address, rate=False)
        if refused is not None:
            return refused
        admitted = gateway.guard.admit(address)
        if admitted is not None:
            code, message, data = admitted
            gateway.metrics.gateway_rejected(jsonrpc.REASONS[code])
            status = 403 if code == jsonrpc.BANNED else 429
            return self._error(request, status, code, message, data, retry_after=1)
        heartbeat = self.options.ws_heartbeat or None
        ws = web.WebSocketResponse(heartbeat=heartbeat, max_msg_size=self.options.max_line,
                                   compress=False, decode_text=False,
                                   timeout=self.options.close_timeout)
        try:
            await ws.prepare(request)
            conn = WsConnection(gateway.new_id(), ws, request.transport, options=self.options,
                                call=gateway.route, metrics=gateway.metrics,
                                gateway_id=gateway.instance_id, throttle=gateway.conn_throttle,
                                peer=peer, address=address,
                                request_bucket=gateway.guard.request_bucket(address),
                                judge=gateway.judge)
            gateway.open_session(conn)
            try:
                await conn.serve()
            finally:
                gateway.close_session(conn)
        finally:
            gateway.guard.release(address)
        return ws
