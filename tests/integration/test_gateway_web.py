"""The gateway over HTTP and WebSocket, through a real HAProxy (``mode http``), with real clients.

The clients are aiohttp's HTTP client and the ``websockets`` library (not
the gateway's code); HAProxy sends PROXY v2 on every server connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from haproxykit import kill_haproxy
from webkit import WebSync, rpc
from websockets.asyncio.client import connect

from meshkit import Settings
from meshkit.gateway import jsonrpc
from meshkit.testing import ServiceProcess, tcp_listener, wait_until

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
PROBE = "tests.integration.services.webprobe:WebProbe"
WAIT = 10.0
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

StartService = Callable[..., list[ServiceProcess]]


def web_env(**options: Any) -> dict[str, str]:
    # Every client here comes from 127.0.0.1: nothing is exempt.
    env = {"MESHKIT_GATEWAY_LIMIT_EXEMPT": "", "MESHKIT_GATEWAY_WEB_LISTENER": "web",
           "MESHKIT_GATEWAY_PROXY_PROTOCOL": "require", "MESHKIT_GATEWAY_TOPICS": "news.*"}
    env.update({f"MESHKIT_GATEWAY_{k.upper()}": str(v) for k, v in options.items()})
    return env


def start_gateways(start_service: StartService, count: int = 1, **options: Any) -> list[ServiceProcess]:
    return start_service(GATEWAY, count=count, env=web_env(**options))


@pytest.fixture
def haproxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[WebSync]:
    public = tcp_listener()
    runner = WebSync(mesh_settings, tmp_path, public)
    yield runner
    runner.stop()
    kill_haproxy(runner.paths)
    public.close()
    runner.close()


def up(haproxy: WebSync, count: int = 1) -> WebSync:
    haproxy.start()
    # Up means HAProxy's GET /health checks pass, and they begin with a PROXY v2 header.
    wait_until(lambda: haproxy.web_up() >= count, WAIT, f"{count} web gateways up in HAProxy")
    return haproxy


async def post(session: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kwargs.setdefault("headers", {"Content-Type": "application/json"})
    async with session.post(url + "/rpc", data=data, **kwargs) as response:
        text = await response.read()
        return response.status, (json.loads(text) if text else None), response.headers


# -- HTTP ---------------------------------------------------------------------------------


def test_http_requests_batches_and_traces_through_haproxy(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    [gw] = start_gateways(start_service)
    up(haproxy)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            status, doc, headers = await post(session, haproxy.url, rpc("webprobe.whoami"),
                                              headers={"Content-Type": "application/json",
                                                       "traceparent": TRACE})
            assert status == 200 and doc["id"] == 1
            seen = doc["result"]
            # The client's real address came through HAProxy's PROXY v2 header, in http mode.
            assert seen["client"].startswith("127.0.0.1:")
            assert seen["client"] != f"127.0.0.1:{haproxy.web_port}"
            assert seen["connection"].startswith(gw.record.instance_id if gw.record else "?")
            # The client's trace is continued into the backend and named in the answer.
            assert seen["trace_id"] == TRACE[3:35] == headers["X-Trace-Id"]
            assert headers["traceparent"].startswith(f"00-{TRACE[3:35]}-")
            assert headers["traceparent"][36:52] != TRACE[36:52]  # the gateway's own span
            # No traceparent: a new trace, still named.
            _, _, plain = await post(session, haproxy.url, rpc("mesh.ping"))
            assert len(plain["X-Trace-Id"]) == 32 and plain["X-Trace-Id"] != TRACE[3:35]
            # A batch: one answer per request, errors included, status 200.
            status, doc, _ = await post(session, haproxy.url, [
                rpc("webprobe.echo", [5], 1), rpc("nope.nothing", None, 2),
                {"jsonrpc": "2.0", "method": "webprobe.echo", "params": [0]}])
            assert status == 200
            by_id = {d["id"]: d for d in doc}
            assert by_id[1]["result"] == 5 and by_id[2]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
            assert len(doc) == 2  # the notification has no answer
            # Only notifications: nothing to answer.
            status, doc, _ = await post(session, haproxy.url,
                                        {"jsonrpc": "2.0", "method": "webprobe.echo", "params": [1]})
            assert status == 204 and doc is None
            # Subscriptions need a connection.
            status, doc, _ = await post(session, haproxy.url, rpc("mesh.subscribe", ["news.*"]))
            assert status == 200 and doc["error"]["code"] == jsonrpc.INVALID_REQUEST
    asyncio.run(main())


def test_http_bad_input_gets_json_rpc_errors_or_http_statuses(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    start_gateways(start_service, max_line=4096, request_rate=5, request_burst=10,
                   cors_origins="https://pool.example")
    up(haproxy)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            # Invalid JSON is a JSON-RPC answer (200), not an HTTP failure.
            status, doc, _ = await post(session, haproxy.url, b'{"jsonrpc": "2.0", "method": ')
            assert status == 200 and doc["error"]["code"] == jsonrpc.PARSE_ERROR and doc["id"] is None
            status, doc, _ = await post(session, haproxy.url, b"\xff\xfe{}")
            assert status == 200 and doc["error"]["code"] == jsonrpc.PARSE_ERROR
            status, doc, _ = await post(session, haproxy.url, b"   ")
            assert status == 200 and doc["error"]["code"] == jsonrpc.PARSE_ERROR
            # HTTP-level failures.
            status, doc, _ = await post(session, haproxy.url, json.dumps(rpc("mesh.ping")),
                                        headers={"Content-Type": "text/plain"})
            assert status == 415 and doc["error"]["code"] == jsonrpc.INVALID_REQUEST
            status, _, _ = await post(session, haproxy.url, b"[" + b"1," * 5000 + b"1]")
            assert status == 413
            async with session.get(haproxy.url + "/rpc") as response:
                assert response.status == 405
            async with session.get(haproxy.url + "/health") as response:
                assert response.status == 200 and await response.text() == "pong"
            # CORS for the configured origin only; a preflight is answered.
            _, _, allowed = await post(session, haproxy.url, rpc("mesh.ping"),
                                       headers={"Content-Type": "application/json",
                                                "Origin": "https://pool.example"})
            assert allowed["Access-Control-Allow-Origin"] == "https://pool.example"
            _, _, other = await post(session, haproxy.url, rpc("mesh.ping"),
                                     headers={"Content-Type": "application/json",
                                              "Origin": "https://evil.example"})
            assert "Access-Control-Allow-Origin" not in other
            async with session.options(haproxy.url + "/rpc", headers={
                    "Origin": "https://pool.example", "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]
            # A flood from one address: past its rate, 429 with Retry-After; nothing is lost.
            began = time.monotonic()
            results = await asyncio.gather(*(post(session, haproxy.url, rpc("webprobe.echo", [i], i))
                                             for i in range(40)))
            took = time.monotonic() - began
            statuses = [s for s, _, _ in results]
            # Burst 10, then 5 per second: however long a loaded machine took to send the flood,
            # no more were let through than the bucket held and refilled meanwhile.
            assert statuses.count(200) >= 3 and statuses.count(429) >= 1
            # Counted by the requests that ran: a 200 may also carry rate_limited (below).
            ran = sum(1 for i, (s, d, _) in enumerate(results) if s == 200 and d.get("result") == i)
            assert ran <= 10 + 5 * took + 1, (ran, statuses.count(200), took)
            assert set(statuses) <= {200, 429}
            limited = next(h for s, _, h in results if s == 429)
            assert int(limited["Retry-After"]) >= 1
            # A 200 is the answer, or (the tokens went to requests that raced it) rate_limited.
            assert all(d.get("result") == i or d["error"]["code"] == jsonrpc.RATE_LIMITED
                       for i, (s, d, _) in enumerate(results) if s == 200)
            assert any(d.get("result") == i for i, (s, d, _) in enumerate(results) if s == 200)
    asyncio.run(main())


def test_a_banned_address_gets_403_and_its_websocket_is_closed_with_4011(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    start_gateways(start_service)
    up(haproxy)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            async with connect(f"ws://127.0.0.1:{haproxy.web_port}/ws") as ws:
                await ws.send(json.dumps(rpc("webprobe.ban_me")))
                got: list[Any] = []
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        got.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))
                assert [d["error"]["code"] for d in got] == [jsonrpc.BANNED]
                assert closed.value.rcvd is not None
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4011, "banned")
            status, doc, headers = await post(session, haproxy.url, rpc("mesh.ping"))
            assert status == 403 and doc["error"]["code"] == jsonrpc.BANNED
            assert int(headers["Retry-After"]) > 60
    asyncio.run(main())


# -- WebSocket ----------------------------------------------------------------------------


def test_websocket_requests_subscriptions_and_pushes_through_haproxy(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    start_gateways(start_service)
    up(haproxy)

    async def main() -> None:
        async with connect(f"ws://127.0.0.1:{haproxy.web_port}/ws") as ws:
            async def call(doc: Any) -> Any:
                await ws.send(json.dumps(doc))
                return json.loads(await asyncio.wait_for(ws.recv(), WAIT))

            seen = (await call(rpc("webprobe.whoami")))["result"]
            assert seen["client"].startswith("127.0.0.1:") and seen["connection"]
            assert (await call(rpc("mesh.subscribe", ["news.*"], 2)))["result"] == ["news.*"]
            batch = await call([rpc("webprobe.echo", ["a"], 3), rpc("webprobe.echo", ["b"], 4)])
            assert sorted(d["result"] for d in batch) == ["a", "b"]
            # A topic push, and a push to this connection alone.
            await ws.send(json.dumps(rpc("webprobe.announce", ["news.today", {"n": 1}], 5)))
            await ws.send(json.dumps(rpc("webprobe.push_me", ["hello.you", [7]], 6)))
            got = [json.loads(await asyncio.wait_for(ws.recv(), WAIT)) for _ in range(4)]
            pushes = {d["method"]: d["params"] for d in got if "method" in d}
            assert pushes == {"news.today": {"n": 1}, "hello.you": [7]}
            # Invalid JSON costs one answer, not the connection.
            await ws.send("{nope")
            assert json.loads(await ws.recv())["error"]["code"] == jsonrpc.PARSE_ERROR
            assert (await call(rpc("mesh.ping", None, 8)))["result"] == "pong"
            # The gateway answers pings (keep-alive).
            pong = await ws.ping()
            await asyncio.wait_for(pong, WAIT)
    asyncio.run(main())


def test_websocket_close_codes_say_why(start_service: StartService, haproxy: WebSync) -> None:
    start_service(PROBE)
    start_gateways(start_service, max_line=2048, idle_timeout=1.0, max_inflight=4)
    up(haproxy)
    url = f"ws://127.0.0.1:{haproxy.web_port}/ws"

    async def closed_with(ws: Any) -> tuple[int, str]:
        while True:
            try:
                await asyncio.wait_for(ws.recv(), WAIT)
            except websockets.ConnectionClosed as exc:
                assert exc.rcvd is not None
                return exc.rcvd.code, exc.rcvd.reason

    async def main() -> None:
        async with connect(url) as ws:  # a message over max_line: 1009
            await ws.send("[" + "1," * 2000 + "1]")
            assert (await closed_with(ws))[0] == 1009
        async with connect(url) as ws:  # silent for idle_timeout: 4007
            started = time.monotonic()
            assert await closed_with(ws) == (4007, "idle_timeout")
            assert time.monotonic() - started >= 0.9
        async with connect(url) as ws:  # a flood over max_inflight: refused requests, still open
            for i in range(12):
                await ws.send(json.dumps(rpc("webprobe.echo", [i], i)))
            answers = [json.loads(await asyncio.wait_for(ws.recv(), WAIT)) for _ in range(12)]
            codes = [a.get("error", {}).get("code") for a in answers]
            assert codes.count(None) >= 4 and jsonrpc.TOO_MANY_IN_FLIGHT in codes
            await ws.send(json.dumps(rpc("mesh.ping", None, 99)))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["result"] == "pong"
    asyncio.run(main())


def test_a_websocket_client_that_stops_reading_is_dropped(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    [gw] = start_gateways(start_service, max_output=65536)
    up(haproxy)

    async def main() -> None:
        # A raw client that upgrades and then never reads: HAProxy's buffers and the
        # kernel's fill, then the gateway's bounded queue; it is dropped, others are served.
        host, port = "127.0.0.1", haproxy.web_port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert b" 101 " in head.split(b"\r\n")[0]
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frame = json.dumps(rpc("webprobe.echo", ["x" * 60000], 1)).encode()
        masked = _client_frame(frame)
        gone = False
        for _ in range(400):  # each answer is ~60 KB that the client never reads
            try:
                writer.write(masked)
                await asyncio.wait_for(writer.drain(), 1.0)
            except (ConnectionError, asyncio.TimeoutError):
                gone = True
                break
        async with connect(f"ws://{host}:{port}/ws") as ws:
            await ws.send(json.dumps(rpc("mesh.ping")))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["result"] == "pong"
        writer.close()
        assert gone or "slow consumer" in gw.tail()
    asyncio.run(main())


def _client_frame(payload: bytes) -> bytes:
    """One masked text frame, as a client must send it (RFC 6455 §5.2)."""
    mask = b"\x01\x02\x03\x04"
    size = len(payload)
    head = b"\x81" + (bytes([0x80 | size]) if size < 126 else
                      bytes([0x80 | 126]) + size.to_bytes(2, "big") if size < 65536 else
                      bytes([0x80 | 127]) + size.to_bytes(8, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_slow_http_clients_are_cut_off_and_others_are_served(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    start_gateways(start_service, request_timeout=1.0)
    up(haproxy)

    async def main() -> None:
        async def raw(data: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", haproxy.web_port)
            writer.write(data)
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(65536), WAIT)
            finally:
                writer.close()

        started = time.monotonic()
        # Headers that never end: HAProxy's "timeout http-request" (1 s here) answers 408.
        headers_only = asyncio.ensure_future(raw(b"POST /rpc HTTP/1.1\r\nHost: x\r\n"))
        # A body that never comes whole: the gateway gives up after request_timeout, 408.
        body_short = asyncio.ensure_future(raw(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"jsonrpc\""))
        async with aiohttp.ClientSession() as session:  # meanwhile, others are served
            status, doc, _ = await post(session, haproxy.url, rpc("webprobe.echo", ["ok"]))
            assert status == 200 and doc["result"] == "ok"
        assert b" 408 " in (await headers_only).split(b"\r\n")[0]
        assert b" 408 " in (await body_short).split(b"\r\n")[0]
        assert time.monotonic() - started < WAIT
    asyncio.run(main())


def test_floods_of_connections_and_of_bad_bodies_meet_the_tcp_limits_and_ban_policy(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    start_gateways(start_service, max_per_address=2, ban_min_requests=4, ban_ratio=0.75)
    up(haproxy)
    url = f"ws://127.0.0.1:{haproxy.web_port}/ws"

    async def main() -> None:
        # Connections per address, as on TCP: the third upgrade is refused with 429.
        async with connect(url) as first, connect(url) as second:
            for ws in (first, second):
                await ws.send(json.dumps(rpc("mesh.ping")))
                assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["result"] == "pong"
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 429
            assert int(refused.value.response.headers["Retry-After"]) >= 1
        # The ban policy counts invalid HTTP bodies: 3 bad of 4 bans the address.
        async with aiohttp.ClientSession() as session:
            for body in (b"{nope", b"[]", b"{nope"):
                status, doc, _ = await post(session, haproxy.url, body)
                assert status == 200 and "error" in doc
            # The fourth request counted (built-ins are not) is what bans.
            status, doc, _ = await post(session, haproxy.url, rpc("webprobe.echo", [1]))
            assert status == 200
            status, doc, _ = await post(session, haproxy.url, rpc("webprobe.echo", [2]))
            assert status == 403 and doc["error"]["code"] == jsonrpc.BANNED
    asyncio.run(main())
