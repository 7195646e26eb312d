"""The restart proof over HTTP and WebSocket: backends restarted, killed and scaled, and a
gateway stopped, under connected WebSocket clients and steady HTTP traffic through HAProxy.

Clients are the ``websockets`` library and aiohttp's HTTP client. Every
request is checked for its own answer; a WebSocket client that is closed, or
an HTTP request answered with anything but 200 and its result, is a failure.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from haproxykit import kill_haproxy
from webkit import WebSync, rpc
from websockets.asyncio.client import connect

from meshkit import Settings
from meshkit.testing import ServiceProcess, tcp_listener, wait_until

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
PROBE = "tests.integration.services.webprobe:WebProbe"
WAIT = 15.0
WS_CLIENTS = 20
HTTP_LOOPS = 4

StartService = Callable[..., list[ServiceProcess]]


def web_env(**options: Any) -> dict[str, str]:
    env = {"MESHKIT_GATEWAY_WEB_LISTENER": "web", "MESHKIT_GATEWAY_PROXY_PROTOCOL": "require",
           "MESHKIT_GATEWAY_DRAIN_GRACE": "5", "MESHKIT_GATEWAY_RECONNECT_WINDOW": "1"}
    env.update({f"MESHKIT_GATEWAY_{k.upper()}": str(v) for k, v in options.items()})
    return env


@pytest.fixture
def haproxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[WebSync]:
    public = tcp_listener()
    runner = WebSync(mesh_settings, tmp_path, public)
    yield runner
    runner.stop()
    kill_haproxy(runner.paths)
    public.close()
    runner.close()


@dataclass
class Tally:
    """What the clients saw."""

    ws_ok: int = 0
    http_ok: int = 0
    failures: list[str] = field(default_factory=list)
    disconnects: int = 0
    answered_by: set[int] = field(default_factory=set)


class Traffic:
    """WebSocket clients and HTTP loops on their own event loop, until :meth:`stop`."""

    def __init__(self, haproxy: WebSync) -> None:
        self.ws_url = f"ws://127.0.0.1:{haproxy.web_port}/ws"
        self.http_url = f"{haproxy.url}/rpc"
        self.tally = Tally()
        self.connected = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        assert self.connected.wait(WAIT), "the WebSocket clients did not connect"
        return self

    def stop(self) -> Tally:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT * 2)
        assert not self._thread.is_alive()
        return self.tally

    def progress(self) -> int:
        return self.tally.ws_ok + self.tally.http_ok

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sockets = [await connect(self.ws_url) for _ in range(WS_CLIENTS)]
        self.connected.set()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._ws_loop(ws, n) for n, ws in enumerate(sockets)),
                                 *(self._http_loop(session, n) for n in range(HTTP_LOOPS)))
        for ws in sockets:
            await ws.close()

    async def _ws_loop(self, ws: Any, n: int) -> None:
        assert self._stop is not None
        i = 0
        while not self._stop.is_set():
            i += 1
            value = f"ws{n}-{i}"
            try:
                await ws.send(json.dumps(rpc("webprobe.whoami", None, value)))
                answer = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            except websockets.ConnectionClosed as exc:
                self.tally.disconnects += 1
                self.tally.failures.append(f"ws client {n} closed: {exc}")
                return
            if answer.get("id") != value or "result" not in answer:
                self.tally.failures.append(f"ws {value}: {answer}")
            else:
                self.tally.ws_ok += 1
                self.tally.answered_by.add(answer["result"]["pid"])
            await asyncio.sleep(0.02)

    async def _http_loop(self, session: aiohttp.ClientSession, n: int) -> None:
        assert self._stop is not None
        i = 0
        while not self._stop.is_set():
            i += 1
            body = json.dumps(rpc("webprobe.echo", [f"http{n}-{i}"], i))
            try:
                async with session.post(self.http_url, data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    status, text = response.status, await response.read()
            except aiohttp.ClientError as exc:
                self.tally.failures.append(f"http {n}-{i}: {exc!r}")
                continue
            doc = json.loads(text) if text else None
            if status != 200 or not doc or doc.get("result") != f"http{n}-{i}":
                self.tally.failures.append(f"http {n}-{i}: {status} {doc}")
            else:
                self.tally.http_ok += 1
            await asyncio.sleep(0.01)


def advanced(traffic: Traffic, by: int = 50) -> None:
    """Wait until the clients got ``by`` more answers (the traffic really flows now)."""
    start = traffic.progress()
    wait_until(lambda: traffic.progress() >= start + by, WAIT, f"{by} more answers")


def test_backends_restarted_killed_and_scaled_under_websocket_and_http_clients(
    start_service: StartService, haproxy: WebSync
) -> None:
    backends = start_service(PROBE, count=2)
    start_service(GATEWAY, count=2, env=web_env())
    haproxy.start()
    wait_until(lambda: haproxy.web_up() >= 2, WAIT, "both web gateways up in HAProxy")
    traffic = Traffic(haproxy).start()
    try:
        advanced(traffic)
        # Rolling restart: a replacement first, then the old one stops gracefully.
        for old in list(backends):
            [new] = start_service(PROBE)
            advanced(traffic)
            assert old.terminate() == 0
            backends.remove(old)
            backends.append(new)
            advanced(traffic)
        # Killed: SIGKILL with calls in flight (idempotent, so retried elsewhere).
        victim = backends.pop(0)
        [spare] = start_service(PROBE)
        backends.append(spare)
        advanced(traffic)
        victim.kill()
        advanced(traffic, 200)
        # Scaled up to four, then back down to one.
        backends += start_service(PROBE, count=3)
        advanced(traffic, 200)
        for old in backends[:-1]:
            assert old.terminate() == 0
        del backends[:-1]
        advanced(traffic, 200)
    finally:
        tally = traffic.stop()
    print(f"ws answers {tally.ws_ok}, http answers {tally.http_ok}, backends seen {len(tally.answered_by)}")
    assert tally.failures == [] and tally.disconnects == 0
    assert tally.ws_ok > 500 and tally.http_ok > 200
    assert len(tally.answered_by) >= 5  # the backends really changed under the clients


def test_a_gateway_stopped_under_steady_http_traffic_fails_no_request(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    gateways = start_service(GATEWAY, count=2, env=web_env())
    haproxy.start()
    wait_until(lambda: haproxy.web_up() >= 2, WAIT, "both web gateways up in HAProxy")

    async def main() -> tuple[int, list[str]]:
        ok, failures = 0, []
        stopping = asyncio.get_running_loop().run_in_executor(None, gateways[0].terminate)
        async with aiohttp.ClientSession() as session:
            async def loop(n: int) -> None:
                nonlocal ok
                i = 0
                while not stopping.done() or i < 100:
                    i += 1
                    body = json.dumps(rpc("webprobe.echo", [f"{n}-{i}"], i))
                    try:
                        async with session.post(f"{haproxy.url}/rpc", data=body,
                                                headers={"Content-Type": "application/json"}) as r:
                            status, doc = r.status, await r.json(content_type=None)
                    except aiohttp.ClientError as exc:
                        failures.append(repr(exc))
                        continue
                    if status == 200 and doc.get("result") == f"{n}-{i}":
                        ok += 1
                    else:
                        failures.append(f"{status} {doc}")
                    await asyncio.sleep(0.01)
            await asyncio.gather(*(loop(n) for n in range(HTTP_LOOPS)))
        assert await stopping == 0
        return ok, failures

    ok, failures = asyncio.run(main())
    print(f"http answers {ok} across the stop")
    assert failures == [] and ok >= 100 * HTTP_LOOPS


def test_websocket_clients_of_a_stopping_gateway_are_asked_to_move_then_closed_with_1001(
    start_service: StartService, haproxy: WebSync
) -> None:
    start_service(PROBE)
    [gw] = start_service(GATEWAY, env=web_env(drain_grace=3, reconnect_window=1))
    haproxy.start()
    wait_until(lambda: haproxy.web_up() >= 1, WAIT, "the web gateway up in HAProxy")

    async def main() -> tuple[list[Any], int, str]:
        async with connect(f"ws://127.0.0.1:{haproxy.web_port}/ws") as ws:
            await ws.send(json.dumps(rpc("mesh.ping")))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["result"] == "pong"
            stopping = asyncio.get_running_loop().run_in_executor(None, gw.terminate)
            got: list[Any] = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:  # a client that ignores the notice: it stays until the grace ends
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))
            assert await stopping == 0
            assert closed.value.rcvd is not None
            return got, closed.value.rcvd.code, closed.value.rcvd.reason

    got, code, reason = asyncio.run(main())
    assert [d.get("method") for d in got][:1] == ["mesh.reconnect"]
    assert got[-1]["error"]["code"] == -32008  # shutting_down, then the close that says so
    assert (code, reason) == (1001, "shutting_down")
