"""The gateway's TCP listener: newline-delimited JSON-RPC, one :class:`~.connection.Connection` each.

Each accepted socket starts with a :class:`~.proxy_front.ProxyFront`,
which reads the PROXY header (a connection without a valid one when it is
required is reset and counted as ``proxy_header``), then hands the socket to
a :class:`~.connection.Connection` for the client it names. That refuses
the client with an error line and a close when the gateway is full
(``too_many_connections``: connections still closing count) or the guard
refuses its address (``banned``, ``address_limited``), and otherwise is
counted among the gateway's connections until its socket is gone. No task
runs per connection: the connection is its socket's protocol.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from ..untrusted import clip
from . import jsonrpc
from .admission import Refusal
from .connection import Connection
from .listening import Host
from .proxy_front import Client, ProxyFront

log = logging.getLogger("meshkit.gateway")


class TcpListener:
    """Accepts TCP clients for one gateway (see the module doc)."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self.options = gateway.options
        self.server: asyncio.Server | None = None

    async def start(self, host: str, ports: list[int]) -> int:
        """Listen on the first of ``ports`` that is free (0: the kernel's choice); return the port."""
        loop = asyncio.get_running_loop()
        for port in ports:
            try:
                self.server = await loop.create_server(
                    self._accepted, host, port, family=socket.AF_INET if ":" not in host else 0,
                    backlog=1024, reuse_address=True)
                break
            except OSError:
                if port == ports[-1]:
                    raise
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Take no new connections (open ones stay)."""
        if self.server is not None:
            self.server.close()

    def _accepted(self) -> asyncio.Protocol:
        options = self.options
        accepted = time.monotonic()
        wait = options.proxy_timeout
        if options.proxy_protocol == "accept" and options.idle_timeout > 0:
            # A silent client may have no header at all: do not hold it past its idle timeout.
            wait = min(wait, options.idle_timeout)
        return ProxyFront(lambda client: self._connection(client, accepted), None,
                          options.proxy_protocol, wait, self._bad_header)

    def _bad_header(self, reason: str) -> None:
        self.gateway.metrics.gateway_rejected("proxy_header")
        self.gateway.note_refusal("proxy_header", f"closing a connection: {clip(reason)}")

    def _connection(self, client: Client, accepted: float) -> Connection:
        gateway = self.gateway
        peer, address = client
        conn = Connection(gateway.new_id(), options=self.options, call=gateway.route,
                          metrics=gateway.metrics, gateway_id=gateway.instance_id,
                          throttle=gateway.conn_throttle, peer=peer, address=address,
                          request_bucket=gateway.guard.request_bucket(address), judge=gateway.judge,
                          on_open=self._open, on_done=self._done)
        conn.last_active = accepted  # waiting for its header counts as idle time
        return conn

    def _open(self, conn: Connection) -> None:
        gateway = self.gateway
        options = self.options
        if len(gateway.connections) >= options.max_connections:
            # Connections that are closing count too, until their socket is gone.
            self._refuse(conn, "too_many_connections", (
                jsonrpc.TOO_MANY_CONNECTIONS,
                f"gateway full ({options.max_connections} connections); retry later", {}))
            return
        refusal = gateway.guard.admit(conn.address)
        if refusal is not None:
            self._refuse(conn, jsonrpc.REASONS[refusal[0]], refusal)
            return
        gateway.open_session(conn)

    def _done(self, conn: Connection) -> None:
        if self.gateway.connections.get(conn.id) is conn:  # admitted (a refused one was never counted)
            self.gateway.close_session(conn)
            self.gateway.guard.release(conn.address)

    def _refuse(self, conn: Connection, reason: str, error: Refusal) -> None:
        self.gateway.metrics.gateway_rejected(reason)
        self.gateway.note_refusal(reason, f"refusing {conn.peer}: {error[1]}")
        conn.send(self.gateway.dialect.error_line(None, *error))
        conn.close()
