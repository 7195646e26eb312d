"""Running the panel: bind (loopback, a kernel-chosen port unless told), say where, serve until SIGTERM.

:func:`serve` starts the mesh client, the :class:`~.panel.Panel` refresh
loop, Circus's event follower and the aiohttp site; once the socket is
bound it writes the URL it got to ``<run_dir>/panel.url`` (what ``meshkit
status`` and ``meshkit up`` print) and calls ``on_ready`` with it. SIGTERM
or SIGINT stops it: the WebSockets are closed (which closes their taps),
then the client; the URL file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import zmq.asyncio
from aiohttp import web

from ..client import AsyncClient
from ..config import Settings
from ..errors import ConfigError
from ..panelurl import remove_url, write_url
from ..stack.control import CircusControl
from ..tasks import Supervised, supervise
from .app import make_app
from .circus import CircusView, RestartCounter, follow_events
from .feed import DEFAULT_MAX_BYTES
from .mesh import ObserveReader
from .panel import Panel
from .servers import ServersView

log = logging.getLogger("meshkit.panel")

@dataclass(frozen=True)
class PanelOptions:
    """Where the panel listens and how much it may ask of the mesh."""

    host: str = "127.0.0.1"
    port: int = 0
    refresh: float = 2.0
    tap_max_rps: float = 20.0
    tap_ttl_s: float = 600.0
    queue_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"panel port must be 0..65535, got {self.port}")
        if not self.refresh > 0 or not self.tap_max_rps > 0 or not self.tap_ttl_s > 0 or self.queue_bytes <= 0:
            raise ConfigError("panel refresh, tap_max_rps, tap_ttl_s and queue_bytes must be positive")

    @property
    def loopback(self) -> bool:
        """Whether the panel listens on loopback only (then it answers loopback ``Host`` names only)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def serve(settings: Settings, options: PanelOptions, run_dir: str | None = None,
                on_ready: Callable[[str], None] | None = None) -> None:
    """Run the panel until SIGTERM/SIGINT (or cancellation).

    ``run_dir`` is the stack's run directory: with it the panel shows
    Circus's watchers and HAProxy's servers and writes its URL there.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    zctx = zmq.asyncio.Context()
    client = AsyncClient(settings)
    await client.start()
    circus = servers = None
    background: list[Supervised] = []
    if run_dir is not None:
        counter = RestartCounter()
        control = CircusControl(f"ipc://{run_dir}/circus.sock", None, timeout=2.0)
        circus = CircusView(control, run_dir, counter)
        servers = ServersView.in_run_dir(run_dir)
        pubsub = f"ipc://{run_dir}/circus-pubsub.sock"
        background.append(supervise("panel.circus-events", lambda: follow_events(pubsub, counter, zctx), logger=log))
    panel = Panel(ObserveReader(client), circus=circus, servers=servers, refresh=options.refresh)
    app = make_app(panel, loopback_only=options.loopback, queue_bytes=options.queue_bytes,
                   tap_max_rps=options.tap_max_rps, tap_ttl_s=options.tap_ttl_s)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    background.append(supervise("panel.refresh", panel.run, logger=log))
    try:
        port = int(runner.addresses[0][1])
        url = _url(options.host, port)
        if run_dir is not None:
            write_url(run_dir, url)
        log.info("panel listening on %s", url)
        if on_ready is not None:
            on_ready(url)
        await stopping.wait()
    finally:
        if run_dir is not None:
            remove_url(run_dir)
        for loop_ in background:
            loop_.cancel()
        for loop_ in background:
            if loop_.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_.task
        await runner.cleanup()  # closes every WebSocket, whose handlers close their taps
        await client.close()
        zctx.term()
