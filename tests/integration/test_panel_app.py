"""The panel as a process against real services, over HTTP and its WebSocket (the browser test is apart)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from panelkit import PanelProcess, taps_open

from meshkit import Settings
from meshkit.blocking import Client
from meshkit.testing import StartService, wait_until

pytestmark = pytest.mark.integration

FRONT = "tests.integration.services.panelhops:PanelFront"
BACK = "tests.integration.services.panelhops:PanelBack"
WAIT = 15.0


@pytest.fixture
def panel(mesh_settings: Settings, tmp_path: Path) -> Iterator[PanelProcess]:
    proc = PanelProcess(mesh_settings, tmp_path / "run", tmp_path / "panel.log")
    yield proc
    assert proc.stop() == 0, proc.log()


def get(url: str) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return dict(await response.json())
    return asyncio.run(fetch())


def state(url: str) -> dict[str, Any]:
    return get(url + "api/state")


def instance_states(doc: dict[str, Any]) -> dict[str, str]:
    topo = doc.get("topology") or {"services": []}
    return {i["instance"]: i["state"] for s in topo["services"] for h in s["hosts"] for i in h["instances"]}


def test_the_page_and_the_state_show_the_running_instances(
        start_service: StartService, mesh_client: Client, panel: PanelProcess) -> None:
    [front] = start_service(FRONT)
    [back, spare] = start_service(BACK, count=2)
    url = panel.wait_ready()
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
    ids = {p.record.instance_id for p in (front, back, spare) if p.record}
    wait_until(lambda: set(instance_states(state(url))) >= ids, WAIT, "the panel to list every instance")

    for _ in range(5):
        assert mesh_client.call("panel-front", "order", ["c1"]) == "shipped:c1"

    def figures() -> bool:
        doc = state(url)
        rows = {(r["service"], r["method"]): r for r in doc["methods"]}
        row = rows.get(("panel-back", "ship"))
        edges = doc["topology"]["edges"]
        return bool(row and row["calls"] == 5 and row["p50_us"] and
                    {"from": "panel-front", "to": "panel-back", "kind": "call", "calls": 5, "errors": 0} in edges)
    wait_until(figures, WAIT, "calls, latency and the front→back edge to show")

    spare.signal_and_wait(signal.SIGKILL, 5)  # its record outlives it (TTL), the panel must not
    assert spare.record is not None
    wait_until(lambda: instance_states(state(url)).get(spare.record.instance_id) == "unreachable", WAIT,
               "the killed instance to show as unreachable")

    async def page() -> tuple[int, str, int, int, int]:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as index:
                text = await index.text()
            async with session.get(url + "static/panel.js") as js, session.get(url + "static/x.js") as missing, \
                    session.get(url + "api/trace/not-hex") as bad:
                return index.status, text, js.status, missing.status, bad.status
    status, text, js, missing, bad = asyncio.run(page())
    assert front.record is not None
    inside = get(url + f"api/instance/{front.record.instance_id}")
    assert inside["info"]["service"] == "panel-front" and "stats" in inside and "inflight" in inside
    assert "error" in get(url + "api/instance/no:such")
    assert (status, js, missing, bad) == (200, 200, 404, 400)
    assert "<title>meshkit panel</title>" in text and "http" not in text.replace('"http://www.w3.org', "")


async def _frames(ws: aiohttp.ClientWebSocketResponse, want: Any, timeout: float) -> dict[str, Any]:
    """The first frame for which ``want(frame)`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        if want(frame):
            return dict(frame)


def test_a_tab_taps_with_a_filter_and_closing_it_closes_the_taps(
        start_service: StartService, mesh_client: Client, mesh_settings: Settings, panel: PanelProcess) -> None:
    [front] = start_service(FRONT)
    start_service(BACK)
    url = panel.wait_ready()
    assert front.record is not None
    stop = threading.Event()

    def traffic() -> None:  # two customers, all the time
        while not stop.is_set():
            for customer in ("c1", "c2"):
                mesh_client.call("panel-front", "order", [customer], meta={"customer": customer})

    async def tab() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "ws") as ws:
            await ws.send_json({"op": "tap", "filter": {"where": {"bad key": "x"}}})
            error = await _frames(ws, lambda f: f["type"] == "error", WAIT)
            assert "where key" in error["message"]
            await ws.send_json({"op": "tap", "filter": {"service": "panel-front", "where": {"customer": "c1"}},
                                "max_rps": 5})
            opened = await _frames(ws, lambda f: f["type"] == "tap", WAIT)
            assert opened["state"] == "open" and opened["max_rps"] == 5
            assert opened["instances"] == [front.record.instance_id] if front.record else False
            events = [await _frames(ws, lambda f: f["type"] == "event", WAIT) for _ in range(3)]
            # The traffic is far above 5 calls a second: the instance sends 5 a second (plus its
            # bucket's first burst) and says how many it left out.
            counted, limited, until = 0, 0, time.monotonic() + 3.0
            while (left := until - time.monotonic()) > 0:
                try:
                    msg = await asyncio.wait_for(ws.receive(), left)
                except asyncio.TimeoutError:
                    break
                frame = json.loads(msg.data)
                counted += frame["type"] == "event"
                if frame["type"] == "tap" and frame["state"] == "limited":
                    limited = frame["dropped"]
            assert 5 <= counted <= 5 * 3 + 5 + 2, counted
            assert limited > 0, (limited, counted)
            # A second tap replaces the first (at once, or when the half-second between two taps is over).
            await ws.send_json({"op": "tap", "filter": {"service": "panel-front", "where": {"customer": "c2"}}})
            again = await _frames(ws, lambda f: f["type"] == "tap", WAIT)
            assert again["state"] == "open" and again["filter"]["where"] == {"customer": "c2"}
            await _frames(ws, lambda f: f["type"] == "event" and f["event"]["meta"]["customer"] == "c2", WAIT)
            assert front.record is not None
            assert await asyncio.to_thread(taps_open, mesh_settings, front.record.instance_id) == 1
        return events

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        events = asyncio.run(tab())
    finally:
        stop.set()
        worker.join(10)
    assert {e["instance"] for e in events} == {front.record.instance_id}
    assert all(e["event"]["meta"]["customer"] == "c1" for e in events)
    # The tab has gone: the panel closed its tap at once, long before an idle tap closes by itself (5 s).
    wait_until(lambda: taps_open(mesh_settings, front.record.instance_id) == 0 if front.record else False, 4.0,
               "the panel to close the tap of the closed tab")


def test_the_feed_is_for_the_panels_own_page_only(panel: PanelProcess) -> None:
    url = panel.wait_ready()

    async def attempts() -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as session:
            for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example"}):
                try:
                    async with session.ws_connect(url + "ws", headers=headers):
                        statuses.append(101)
                except aiohttp.WSServerHandshakeError as exc:
                    statuses.append(exc.status)
            async with session.get(url, headers={"Host": "rebound.example:80"}) as page:
                statuses.append(page.status)
            async with session.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as ws:
                await ws.send_str("not json at all")
                error = await _frames(ws, lambda f: f["type"] == "error", WAIT)
                statuses.append(400 if error else 0)
        return statuses

    assert asyncio.run(attempts()) == [403, 403, 403, 400]
