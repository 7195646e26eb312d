"""The PROXY header in front of a connection, read before its protocol (HTTP, or a TCP line client) sees a byte.

HAProxy sends every gateway connection, HTTP ones included, a PROXY v2
header (``send-proxy-v2``): the web listener learns each client's real
address exactly as the TCP listener does, and trusts no ``X-Forwarded-For``
header (which any client can write). :class:`ProxyFront` is the
:class:`asyncio.Protocol` a listening socket starts each connection with:

* it reads the header under the gateway's ``proxy_protocol`` mode
  (``require``, ``accept``, ``off``: :mod:`~meshkit.gateway.admission` says
  what each does), bounded in bytes (:data:`~.admission.MAX_HEADER`) and in
  time (``proxy_timeout``);
* then hands the transport to the protocol ``factory(client)`` makes for
  the client's ``(peer text, address)`` (the HTTP server's, or a TCP
  :class:`~meshkit.gateway.connection.Connection`), replaying the bytes read
  after the header, and, given ``clients``, records the client there under
  the transport, where HTTP request handlers find it (:func:`client_for`);
* a connection without a valid header when one is required is reset and
  counted (``on_refused``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, cast

from .admission import MAX_HEADER, client_of
from .linger import reset
from .proxy_protocol import V1_PREFIX, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse

Client = tuple[str, "str | None"]
Clients = weakref.WeakKeyDictionary[asyncio.BaseTransport, Client]


def _may_be_header(buf: bytes | bytearray) -> bool:
    """Whether ``buf`` can still begin a PROXY header (an HTTP request never does)."""
    head = bytes(buf[:12])
    return V2_SIGNATURE.startswith(head) or V1_PREFIX.startswith(head[:6])


class ProxyFront(asyncio.Protocol):
    """Reads one connection's PROXY header, then passes the connection on (see the module doc)."""

    def __init__(self, factory: Callable[[Client], asyncio.Protocol], clients: Clients | None, mode: str,
                 timeout: float, on_refused: Callable[[str], None]) -> None:
        self._factory = factory
        self._clients = clients
        self._mode = mode
        self._timeout = timeout
        self._on_refused = on_refused
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._handed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (meshkit/loops.py) implement
        # asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if self._mode == "off":
            self._hand_over(None, b"")
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._handed:
            return
        self._buf += data
        if self._mode == "accept" and not _may_be_header(self._buf):
            self._hand_over(None, bytes(self._buf))
            return
        try:
            header = parse(self._buf)
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if header is not None:
            self._hand_over(header, bytes(self._buf[header.length:]))
        elif len(self._buf) > MAX_HEADER:
            self._refuse(f"no PROXY header in the first {MAX_HEADER} bytes")

    def eof_received(self) -> bool | None:
        if self._handed:
            return None
        if self._mode == "accept" and not self._buf:
            # Connected and left without a byte: no header, and its protocol sees the EOF itself.
            return self._hand_over(None, b"").eof_received()
        self._refuse("connection closed before a complete PROXY header")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _timed_out(self) -> None:
        if self._handed:
            return
        if self._mode == "accept" and not self._buf:
            self._hand_over(None, b"")  # a silent client: the HTTP server's own timeouts apply
        else:
            self._refuse(f"no complete PROXY header within {self._timeout:g}s")

    def _refuse(self, reason: str) -> None:
        self._handed = True
        if self._timer is not None:
            self._timer.cancel()
        self._on_refused(reason)
        if self._transport is not None:
            reset(self._transport)  # a reset: it never spoke our protocol

    def _hand_over(self, header: ProxyHeader | None, rest: bytes) -> asyncio.Protocol:
        self._handed = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        assert transport is not None
        client = client_of(header, transport.get_extra_info("peername"))
        if self._clients is not None:
            self._clients[transport] = client
        protocol = self._factory(client)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if rest:
            protocol.data_received(rest)
        return protocol


def client_for(clients: Clients, transport: Any) -> Client:
    """The ``(peer text, address)`` :class:`ProxyFront` recorded for ``transport``."""
    if transport is not None:
        found = clients.get(transport)
        if found is not None:
            return found
    return "", None
