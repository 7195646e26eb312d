"""The gateway's TCP listener: newline-delimited JSON-RPC, one :class:`~.connection.Connection` each.

For each accepted socket, :class:`TcpListener` reads the PROXY header
(:func:`~.admission.read_proxy_header`; a connection without a valid one
when it is required is reset and counted as ``proxy_header``), refuses the
client with an error line and a close when the gateway is full
(``too_many_connections``: connections still closing count) or the guard
refuses its address (``banned``, ``address_limited``), and otherwise
serves it among the gateway's connections until it closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from ..untrusted import clip
from . import jsonrpc
from .admission import Refusal, client_of, read_proxy_header
from .connection import Connection
from .listening import Host
from .proxy_protocol import ProxyHeaderError
from .session import Session

log = logging.getLogger("meshkit.gateway")


class TcpListener:
    """Accepts TCP clients for one gateway (see the module doc)."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self.options = gateway.options
        self.server: asyncio.Server | None = None

    async def start(self, host: str, ports: list[int]) -> int:
        """Listen on the first of ``ports`` that is free (0: the kernel's choice); return the port."""
        for port in ports:
            try:
                self.server = await asyncio.start_server(
                    self._on_client, host, port, family=socket.AF_INET if ":" not in host else 0,
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

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gateway = self.gateway
        options = self.options
        conn_id = gateway.new_id()
        accepted = time.monotonic()
        wait = options.proxy_timeout
        if options.proxy_protocol == "accept" and options.idle_timeout > 0:
            # A silent client may have no header at all: do not hold it past its idle timeout.
            wait = min(wait, options.idle_timeout)
        try:
            header, initial = await read_proxy_header(reader, options.proxy_protocol, wait)
        except (ProxyHeaderError, ConnectionError, OSError) as exc:
            gateway.metrics.gateway_rejected("proxy_header")
            gateway.note_refusal("proxy_header", f"closing {conn_id} from "
                                 f"{clip(writer.get_extra_info('peername'))}: {clip(str(exc))}")
            dropped = Connection(conn_id, reader, writer, options=options, call=gateway.route,
                                 metrics=gateway.metrics)
            dropped.close(abort=True)  # a reset: it never spoke our protocol
            await dropped.wait_closed()
            return
        peer, address = client_of(header, writer.get_extra_info("peername"))
        conn = Connection(conn_id, reader, writer, options=options, call=gateway.route,
                          metrics=gateway.metrics, gateway_id=gateway.instance_id,
                          throttle=gateway.conn_throttle, initial=initial, peer=peer, address=address,
                          request_bucket=gateway.guard.request_bucket(address), judge=gateway.judge)
        conn.last_active = accepted  # waiting for its header counts as idle time
        if len(gateway.connections) >= options.max_connections:
            # Connections that are closing count too, until their socket is gone.
            await self._refuse(conn, "too_many_connections", (
                jsonrpc.TOO_MANY_CONNECTIONS,
                f"gateway full ({options.max_connections} connections); retry later", {}))
            return
        refusal = gateway.guard.admit(address)
        if refusal is not None:
            await self._refuse(conn, jsonrpc.REASONS[refusal[0]], refusal)
            return
        try:
            await gateway.serve_session(conn, conn.serve())
        finally:
            gateway.guard.release(address)

    async def _refuse(self, conn: Session, reason: str, error: Refusal) -> None:
        self.gateway.metrics.gateway_rejected(reason)
        self.gateway.note_refusal(reason, f"refusing {conn.peer}: {error[1]}")
        conn.send(self.gateway.dialect.error_line(None, *error))
        conn.close()
        await conn.wait_closed()
