"""Asking a stopping gateway's clients to move, in waves; and telling them a backend is gone.

* :func:`reconnect_line` is the notification (``reconnect_method``, in the
  listener's dialect: Stratum's carries ``"id": null``): for
  ``client.reconnect`` (Stratum, as ckpool sends it) the params are
  ``[host, port, 0]`` (``[]`` without ``reconnect_address``: reconnect where
  you were); for any other method ``{"host", "port", "wait": 0}`` (``{}``).
* :func:`move_clients` sends it to a snapshot of the connections in the
  waves of :func:`meshkit.gateway.waves.plan`, skipping those already gone.
* :class:`GoneWatch` (pure, driven by ``now``) says when a service that
  clients called has had no instance for ``gone_after`` seconds, once per
  absence; :func:`watch_gone` acts on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ..untrusted import clip
from . import dialect, jsonrpc, waves
from .options import GatewayOptions

log = logging.getLogger("meshkit.gateway")


class Movable(Protocol):
    """What :func:`move_clients` needs of a connection."""

    closed: bool

    def send(self, line: bytes) -> bool: ...


class Caller(Movable, Protocol):
    """What :func:`watch_gone` needs of a connection."""

    services_used: set[str]

    def close(self, code: int | None = None, message: str = "", *, abort: bool = False) -> None: ...


def reconnect_line(options: GatewayOptions) -> bytes:
    """The notification asking a client to reconnect (see the module doc)."""
    host, _, port_text = options.reconnect_address.rpartition(":")
    params: Any
    if options.reconnect_method == "client.reconnect":
        params = [host.strip("[]"), int(port_text), 0] if host else []
    else:
        params = {"host": host.strip("[]"), "port": int(port_text), "wait": 0} if host else {}
    return dialect.named(options.dialect).notification_line(options.reconnect_method, params)


class Progress:
    """How many clients :func:`move_clients` has told so far (readable after it is cancelled)."""

    told = 0


async def move_clients(connections: Sequence[Movable], options: GatewayOptions, window: float,
                       progress: Progress | None = None) -> int:
    """Tell ``connections`` to reconnect elsewhere, in waves over ``window`` s; return how many were told.

    A wave that went out late does not pull the next one closer: waves are
    never nearer each other than the plan says, so no second holds more
    than the plan's rate however the event loop was delayed.
    """
    line = reconnect_line(options)
    loop = asyncio.get_running_loop()
    start = loop.time()
    progress = progress or Progress()
    index = 0
    last: tuple[float, float] | None = None  # (planned offset, when it went out) of the previous wave
    for offset, count in waves.plan(len(connections), window, options.reconnect_rate):
        at = start + offset if last is None else max(start + offset, last[1] + offset - last[0])
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        last = (offset, loop.time())
        for conn in connections[index:index + count]:
            if not conn.closed and conn.send(line):
                progress.told += 1
        index += count
    return progress.told


def gone_line(options: GatewayOptions, service: str) -> bytes:
    """The notification that ``service`` has no instance (``gone_method``, params ``{"service"}``)."""
    return dialect.named(options.dialect).notification_line(options.gone_method, {"service": service})


class GoneWatch:
    """Which called services have been without an instance for ``after`` seconds (reported once)."""

    def __init__(self, after: float, instances: Callable[[str], int]) -> None:
        self.after = after
        self._instances = instances
        self._missing_since: dict[str, float] = {}
        self._reported: set[str] = set()

    def check(self, services: Iterable[str], now: float) -> list[str]:
        """The services of ``services`` that are gone as of ``now`` and were not reported yet."""
        gone: list[str] = []
        watched = set(services)
        for service in watched:
            if self._instances(service):
                self._missing_since.pop(service, None)
                self._reported.discard(service)
                continue
            since = self._missing_since.setdefault(service, now)
            if now - since >= self.after and service not in self._reported:
                self._reported.add(service)
                gone.append(service)
        for service in set(self._missing_since) - watched:  # nobody uses it any more
            del self._missing_since[service]
            self._reported.discard(service)
        return sorted(gone)


async def watch_gone(options: GatewayOptions, connections: Callable[[], Sequence[Caller]],
                     instances: Callable[[str], int]) -> None:
    """Tell (and with ``gone_disconnect`` close) the clients of services gone for ``gone_after`` s.

    Runs forever (the gateway supervises it). A client is told about a
    service only if it called that service.
    """
    watch = GoneWatch(options.gone_after, instances)
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(min(1.0, options.gone_after / 4))
        open_now = connections()
        for service in watch.check({s for conn in open_now for s in conn.services_used}, loop.time()):
            line = gone_line(options, service)
            users = [c for c in open_now if service in c.services_used and not c.closed]
            log.warning("service %s has had no instance for %gs: telling %d clients%s",
                        clip(service), options.gone_after, len(users),
                        " and closing them" if options.gone_disconnect else "")
            for conn in users:
                conn.send(line)
                if options.gone_disconnect:
                    conn.close(jsonrpc.NO_INSTANCE, f"service {service} is gone; reconnect later")
