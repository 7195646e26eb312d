"""The panel's web application (aiohttp): the page, a JSON API and one WebSocket per tab.

Routes::

    GET /                  the page (static/index.html; with panel.js and panel.css, no other asset)
    GET /static/{file}     panel.js, panel.css
    GET /api/state         the last state read (Panel.state), as JSON
    GET /api/trace/{id}    {"trace_id", "spans": [...], "missing": {instance: why}}: that trace's spans
    GET /api/instance/{id} {"info", "stats", "inflight", "spans", "errors"}: one instance, as meshkit inspect
    GET /ws                the live feed (protocol below)

The WebSocket carries JSON text frames. The panel sends ``{"type": "state",
...}`` after every refresh, ``{"type": "event", "instance": id, "event":
{...}}`` for each call or push a tap caught, ``{"type": "tap", "state":
"open"|"closed"|"instance-closed", ...}``, ``{"type": "dropped", "count":
n}`` when this tab's send queue was full and frames were dropped, and
``{"type": "error", "message": ...}`` for a request it refused. The page
sends ``{"op": "tap", "filter": {...}, "max_rps": n}`` (replacing its tap,
if any) and ``{"op": "untap"}``. A tab has at most one tap; closing the tab
(the socket) closes it on every instance.

Only the page's own origin may open the WebSocket (a page from elsewhere,
running in the same browser, must not read the mesh), and requests whose
``Host`` is not a loopback name are refused while the panel listens on
loopback (DNS rebinding). See ``docs/panel.md`` for reaching it from
another machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from ..untrusted import clip
from .feed import DEFAULT_MAX_BYTES, SendQueue
from .panel import Feed, Panel
from .taps import TapFilter, TapSession

log = logging.getLogger("meshkit.panel.app")

STATIC_FILES = {"panel.js": "text/javascript", "panel.css": "text/css"}
TRACE_ID = re.compile(r"[0-9a-f]{32}")
MAX_TABS = 32  # open WebSockets; one more is refused
MAX_INCOMING = 16 * 1024  # bytes of one message from a tab
TAP_REOPEN_INTERVAL = 0.5  # seconds between two taps opened by one tab
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

PANEL_KEY = web.AppKey("panel", Panel)
OPTIONS_KEY = web.AppKey("options", dict)


def _static(name: str) -> bytes:
    return resources.files("meshkit.panel").joinpath("static").joinpath(name).read_bytes()


def make_app(panel: Panel, *, loopback_only: bool = True, queue_bytes: int = DEFAULT_MAX_BYTES,
             tap_max_rps: float = 20.0, tap_ttl_s: float = 600.0) -> web.Application:
    """The application serving ``panel``; ``tap_max_rps`` bounds each tab's tap (all instances together)."""
    app = web.Application(middlewares=[_host_guard] if loopback_only else [])
    app[PANEL_KEY] = panel
    app[OPTIONS_KEY] = {"queue_bytes": queue_bytes, "tap_max_rps": tap_max_rps, "tap_ttl_s": tap_ttl_s}
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static_file)
    app.router.add_get("/api/state", _api_state)
    app.router.add_get("/api/trace/{trace_id}", _api_trace)
    app.router.add_get("/api/instance/{instance_id}", _api_instance)
    app.router.add_get("/ws", _websocket)
    app.on_shutdown.append(_close_tabs)
    return app


async def _close_tabs(app: web.Application) -> None:
    """On shutdown: close every tab's socket (its handler then closes its tap)."""
    for feed in list(app[PANEL_KEY].feeds):
        await _stop_tap(feed)
        if feed.socket is not None:
            await feed.socket.close(code=1001, message=b"panel stopping")


@web.middleware
async def _host_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    host = (request.host or "").rsplit(":", 1)[0].strip("[]") if request.host else ""
    if host.lower() not in LOOPBACK_NAMES:
        return web.Response(status=403, text=f"this panel answers loopback names only, not {clip(host)}\n")
    response: web.StreamResponse = await handler(request)
    return response


async def _index(request: web.Request) -> web.Response:
    return web.Response(body=_static("index.html"), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def _static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound(text=f"no such file: {clip(name)}\n")
    return web.Response(body=_static(name), content_type=STATIC_FILES[name])


async def _api_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[PANEL_KEY].state(), dumps=lambda v: json.dumps(v, default=str))


async def _api_trace(request: web.Request) -> web.Response:
    trace_id = request.match_info["trace_id"].lower()
    if not TRACE_ID.fullmatch(trace_id):
        return web.json_response({"error": f"a trace id is 32 hex digits, got {clip(trace_id)}"}, status=400)
    try:
        answer = await request.app[PANEL_KEY].trace(trace_id)
    except Exception as exc:
        return web.json_response({"error": clip(str(exc) or type(exc).__name__)}, status=502)
    return web.json_response(answer, dumps=lambda v: json.dumps(v, default=str))


async def _api_instance(request: web.Request) -> web.Response:
    instance_id = request.match_info["instance_id"]
    try:
        answer = await request.app[PANEL_KEY].inspect(instance_id)
    except ValueError as exc:
        return web.json_response({"error": clip(str(exc), 300)}, status=400)
    except Exception as exc:
        return web.json_response({"error": clip(str(exc) or type(exc).__name__)}, status=502)
    return web.json_response(answer, dumps=lambda v: json.dumps(v, default=str))


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser (curl, a test client): the same-origin rule is a browser's
    return urlsplit(origin).netloc.lower() == (request.host or "").lower()


async def _websocket(request: web.Request) -> web.StreamResponse:
    panel = request.app[PANEL_KEY]
    options = request.app[OPTIONS_KEY]
    if not _same_origin(request):
        raise web.HTTPForbidden(text="the live feed is for this panel's own page only\n")
    if len(panel.feeds) >= MAX_TABS:
        raise web.HTTPServiceUnavailable(text=f"{MAX_TABS} tabs are open already\n")
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_INCOMING)
    await ws.prepare(request)
    feed = Feed(SendQueue(options["queue_bytes"]), socket=ws)
    panel.feeds.add(feed)
    if panel.state().get("at") is not None:
        feed.queue.put(json.dumps(panel.state(), default=str))
    sender = asyncio.create_task(_send_loop(ws, feed.queue))
    last_tap = -TAP_REOPEN_INTERVAL
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                request_ = json.loads(msg.data)
                op = request_.get("op") if isinstance(request_, dict) else None
                if op == "tap":
                    # At most one tap opened per interval and tab: a quicker one waits its turn
                    # (this tab's messages wait with it), so clicking fast cannot churn the mesh's taps.
                    wait = last_tap + TAP_REOPEN_INTERVAL - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    last_tap = time.monotonic()
                    await _start_tap(panel, feed, request_, options)
                elif op == "untap":
                    await _stop_tap(feed)
                    feed.queue.put(json.dumps({"type": "tap", "state": "closed", "reason": "asked"}))
                else:
                    raise ValueError(f"unknown op {clip(op)}; expected tap or untap")
            except ValueError as exc:
                feed.queue.put(json.dumps({"type": "error", "message": clip(str(exc), 300)}))
    finally:
        panel.feeds.discard(feed)
        await _stop_tap(feed)
        feed.queue.close()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return ws


async def _send_loop(ws: web.WebSocketResponse, queue: SendQueue) -> None:
    """Send queued frames in order; ``send_str`` waits while the browser is slow, the queue drops meanwhile."""
    while (frame := await queue.get()) is not None:
        try:
            await ws.send_str(frame)
        except (ConnectionError, RuntimeError):
            return


async def _start_tap(panel: Panel, feed: Feed, request: dict[str, Any], options: dict[str, Any]) -> None:
    tap_filter = TapFilter.from_json(request.get("filter"))
    limit = float(options["tap_max_rps"])
    asked = request.get("max_rps", limit)
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not asked > 0:
        raise ValueError(f"max_rps is a positive number, got {clip(asked)}")
    await _stop_tap(feed)

    def emit(event: dict[str, Any]) -> None:
        feed.queue.put(json.dumps(event, default=str))

    session = TapSession(panel.reader, tap_filter, emit,
                         max_rps=min(float(asked), limit), ttl_s=float(options["tap_ttl_s"]))
    # "open" is said once the instances' taps are open, so what the tab sees from then on is caught.
    await session.sync()
    feed.tap = (session, asyncio.create_task(session.run()))
    feed.queue.put(json.dumps({"type": "tap", "state": "open", "filter": tap_filter.to_json(),
                               "max_rps": session.max_rps, "ttl_s": session.ttl_s,
                               "instances": sorted(session.open)}))


async def _stop_tap(feed: Feed) -> None:
    if feed.tap is None:
        return
    session, task = feed.tap
    feed.tap = None
    session.closed = True  # ends its loop even if a cancellation is swallowed on the way
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await session.close()  # in case the task was cancelled before it started
