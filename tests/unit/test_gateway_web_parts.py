"""The pure parts of the HTTP/WebSocket listener: PROXY front, close codes, per-address buckets,
options, the shared session core's reply path, and the gateway's error codes on the wire."""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any

import pytest

from meshkit import loops
from meshkit.errors import ConfigError, RefusedError, error_from_wire, register_error_code
from meshkit.gateway import GatewayOptions, jsonrpc
from meshkit.gateway.bans import BanClientError, ClientFaultError
from meshkit.gateway.jsonrpc import Request
from meshkit.gateway.limits import AddressBuckets
from meshkit.gateway.proxy_front import Clients, ProxyFront, client_for
from meshkit.gateway.session import Session
from meshkit.gateway.state import ConnectionGoneError
from meshkit.gateway.web import HttpExchange
from meshkit.gateway.websocket import close_code
from meshkit.metrics import Metrics

V2_TCP4 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([198, 51, 100, 7, 127, 0, 0, 1])
           + (5555).to_bytes(2, "big") + (80).to_bytes(2, "big"))


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.aborted = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 4000) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.made = False
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.data += data


def front(mode: str, timeout: float = 5.0) -> tuple[ProxyFront, FakeTransport, Recorder, Clients, list[str]]:
    inner = Recorder()
    clients: Clients = weakref.WeakKeyDictionary()
    refused: list[str] = []
    proto = ProxyFront(lambda _client: inner, clients, mode, timeout, refused.append)
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport, inner, clients, refused


def test_a_v2_header_names_the_client_and_the_rest_reaches_the_http_server() -> None:
    async def main() -> None:
        proto, transport, inner, clients, refused = front("require")
        proto.data_received(V2_TCP4[:10])  # a header in pieces
        assert not inner.made
        proto.data_received(V2_TCP4[10:] + b"POST /rpc HTTP/1.1\r\n")
        assert inner.made and inner.data == b"POST /rpc HTTP/1.1\r\n"
        assert transport.protocol is inner and not refused
        assert client_for(clients, transport) == ("198.51.100.7:5555", "198.51.100.7")
        assert client_for(clients, FakeTransport()) == ("", None)
        assert client_for(clients, None) == ("", None)
    asyncio.run(main())


def test_accept_mode_passes_a_plain_http_request_on_at_once_even_one_starting_with_p() -> None:
    async def main() -> None:
        proto, transport, inner, clients, refused = front("accept")
        proto.data_received(b"POST /rpc HTTP/1.1\r\n")  # "P" could begin "PROXY ": it does not
        assert inner.data == b"POST /rpc HTTP/1.1\r\n" and not refused
        assert client_for(clients, transport) == ("10.0.0.1:4000", "10.0.0.1")
    asyncio.run(main())


def test_require_mode_resets_a_connection_without_a_valid_header() -> None:
    async def main() -> None:
        for data in (b"GET /health HTTP/1.1\r\n", b"PROXY TCP4 300.1.2.3 127.0.0.1 1 2\r\n"):
            proto, transport, inner, _, refused = front("require")
            proto.data_received(data)
            assert transport.aborted and not inner.made and len(refused) == 1
        timed_out: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        proto = ProxyFront(lambda _client: Recorder(), weakref.WeakKeyDictionary(), "require", 0.01,
                           timed_out.set_result)
        transport = FakeTransport()
        proto.connection_made(transport)
        proto.data_received(b"PROX")
        assert "within" in await asyncio.wait_for(timed_out, 5.0)
        assert transport.aborted
    asyncio.run(main())


def test_off_mode_reads_no_header() -> None:
    async def main() -> None:
        _, transport, inner, clients, _ = front("off")
        assert inner.made and client_for(clients, transport)[1] == "10.0.0.1"
    asyncio.run(main())


def test_the_front_hands_a_real_connection_over_on_meshkits_loop() -> None:
    # uvloop's transports implement asyncio.Transport without subclassing it.
    async def main() -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        inner = Recorder()
        got = loop.create_future()
        clients: Clients = weakref.WeakKeyDictionary()

        class Inner(Recorder):
            def data_received(self, data: bytes) -> None:
                inner.data += data
                if inner.data.endswith(b"\n") and not got.done():
                    got.set_result(inner.data)

        server = await loop.create_server(
            lambda: ProxyFront(lambda _client: Inner(), clients, "require", 5.0, got.set_exception),
            "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(V2_TCP4 + b"GET /health\n")
            data = await asyncio.wait_for(got, 5.0)
            (peer, _), = clients.values()
            writer.close()
            return data, peer
        finally:
            server.close()

    data, peer = loops.run(main())
    assert data == b"GET /health\n"
    assert peer.startswith("198.51.100.7")


def test_close_codes_say_why() -> None:
    assert close_code(None) == 1000
    assert close_code(jsonrpc.SHUTTING_DOWN) == 1001
    assert close_code(jsonrpc.INTERNAL_ERROR) == 1011
    assert close_code(jsonrpc.IDLE_TIMEOUT) == 4007
    assert close_code(jsonrpc.SLOW_CONSUMER) == 4009
    assert close_code(jsonrpc.BANNED) == 4011
    assert close_code(jsonrpc.ADDRESS_LIMITED) == 4013
    assert close_code(jsonrpc.PARSE_ERROR) == 4000


def test_address_buckets_limit_each_address_and_remember_a_bounded_number() -> None:
    buckets = AddressBuckets(rate=2.0, burst=3, max_addresses=2)
    assert [buckets.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b", 0.0)  # another address has its own
    assert buckets.take("a", 0.5)  # one token back after half a second
    buckets.take("c", 0.5)
    assert buckets.tracked == 2
    assert all(AddressBuckets(0, 1, 1).take("a", 0.0) for _ in range(100))  # rate 0: no limit


@pytest.mark.parametrize("options", [
    {"http_path": "rpc"}, {"ws_path": "/w s"}, {"health_path": "/rpc"},
    {"ws_heartbeat": -1}, {"web_listener": "stratum"},
])
def test_bad_web_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        GatewayOptions(**options)


async def _route(session: Session, request: Request) -> Any:
    return {"echo": request.params, "stateful": session.stateful}


def test_an_http_exchange_answers_through_its_reply_and_refuses_subscriptions() -> None:
    async def main() -> None:
        def exchange() -> HttpExchange:
            return HttpExchange("gw-1", options=GatewayOptions(), call=_route,
                                metrics=Metrics("", "", "gateway"))

        got: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        exchange().handle_line(b'[{"jsonrpc":"2.0","id":1,"method":"x.y","params":[1]},'
                               b'{"jsonrpc":"2.0","id":2,"method":"mesh.subscribe","params":["jobs.a"]}]',
                               got.set_result)
        answers = {d["id"]: d for d in json.loads(await asyncio.wait_for(got, 5.0) or b"")}
        assert answers[1]["result"] == {"echo": [1], "stateful": False}
        assert answers[2]["error"]["code"] == jsonrpc.INVALID_REQUEST
        nothing: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        exchange().handle_line(b'{"jsonrpc":"2.0","method":"x.y"}', nothing.set_result)
        assert await asyncio.wait_for(nothing, 5.0) is None  # notifications only: no answer
        assert not exchange().send(b"push\n")  # nothing but the answer goes back over HTTP
    asyncio.run(main())


def test_the_gateways_errors_travel_as_codes() -> None:
    for cls in (ClientFaultError, BanClientError, ConnectionGoneError):
        received = error_from_wire(cls.code, "why", service="s", method="m")
        assert type(received) is cls and received.message == "why"
    coded = error_from_wire("client_fault", "[23] low difficulty")
    assert isinstance(coded, ClientFaultError) and coded.client_code == 23
    assert {ClientFaultError.code, BanClientError.code, ConnectionGoneError.code} == {
        "client_fault", "ban_client", "connection_gone"}

    class Taken(RefusedError):
        code = "client_fault"

    with pytest.raises(ValueError, match="client_fault"):
        register_error_code(Taken)
