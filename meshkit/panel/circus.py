"""What Circus says about the stack: watchers, their processes, restarts and flap-control stops.

:class:`RestartCounter` is the pure core: fed circusd's events
(``watcher.<name>.reap`` / ``.spawn``), it counts each watcher's exits since
the panel started, the abnormal ones (exit code other than 0) apart, and
keeps the last exit. :class:`CircusView` reads the rest when asked — status,
number of processes, pids and their ages (:class:`CircusControl`, blocking:
the panel calls it in a thread) and the watchers flap control stopped
(``flapped.json`` in the run directory, :mod:`meshkit.stack.flap`) — and
:func:`follow_events` feeds the counter from circusd's pub/sub socket.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import zmq
import zmq.asyncio

from ..stack.exits import watcher_event
from ..stack.flap import read_flapped
from ..untrusted import clip

log = logging.getLogger("meshkit.panel.circus")

MAX_EVENT_BYTES = 64 * 1024  # a circusd event is a small JSON object; anything larger is refused
MAX_WATCHERS = 256  # watchers counted; a stack has a handful


class Control(Protocol):
    """The part of :class:`meshkit.stack.control.CircusControl` the panel reads."""

    def status(self) -> dict[str, str]: ...
    def pids(self, watcher: str) -> list[int]: ...
    def numprocesses(self, watcher: str) -> int: ...


@dataclass
class WatcherExits:
    exits: int = 0
    abnormal: int = 0
    last_code: int | None = None
    last_at: float | None = None  # epoch seconds


class RestartCounter:
    """Exits per watcher, from circusd's events (``clock`` gives epoch seconds)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.watchers: dict[str, WatcherExits] = {}

    def handle(self, topic: str, data: Mapping[str, Any]) -> None:
        """Count one event; anything but a watcher's ``reap`` is ignored."""
        parts = topic.split(".")
        if len(parts) < 3 or parts[0] != "watcher" or parts[-1] != "reap":
            return
        name = ".".join(parts[1:-1])
        if name not in self.watchers and len(self.watchers) >= MAX_WATCHERS:
            return
        entry = self.watchers.setdefault(name, WatcherExits())
        code = data.get("exit_code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        entry.exits += 1
        if code != 0:
            entry.abnormal += 1
        entry.last_code, entry.last_at = code, self.clock()

    def of(self, watcher: str) -> WatcherExits:
        return self.watchers.get(watcher, WatcherExits())


def _age(pid: int, now: float) -> float | None:
    try:
        return max(0.0, now - float(psutil.Process(pid).create_time()))
    except psutil.Error:
        return None


class CircusView:
    """Reads one stack's watchers (blocking: call :meth:`read` in a thread)."""

    def __init__(self, control: Control, run_dir: str, counter: RestartCounter,
                 clock: Callable[[], float] = time.time) -> None:
        self.control = control
        self.run_dir = run_dir
        self.counter = counter
        self.clock = clock

    def read(self) -> dict[str, Any]:
        """``{"watchers": [...]}``, or ``{"error": why}`` when circusd does not answer."""
        if not os.path.exists(os.path.join(self.run_dir, "circus.sock")):
            return {"error": f"no circusd runs from {clip(self.run_dir)}"}
        try:
            statuses = self.control.status()
            now = self.clock()
            flapped = read_flapped(self.run_dir)
            watchers = []
            for name, status in sorted(statuses.items())[:MAX_WATCHERS]:
                pids = self.control.pids(name) if status == "active" else []
                exits = self.counter.of(name)
                stop = flapped.get(name)
                watchers.append({
                    "name": name, "status": "stopped (flapping)" if stop else status,
                    "numprocesses": self.control.numprocesses(name),
                    "processes": [{"pid": pid, "age_s": _age(pid, now)} for pid in pids],
                    "restarts": exits.exits, "abnormal_exits": exits.abnormal,
                    "last_exit_code": exits.last_code, "last_exit_at": exits.last_at,
                    "flapped": dict(stop) if isinstance(stop, Mapping) else None,
                })
        except Exception as exc:  # circusd gone or busy: the panel shows why and keeps going
            return {"error": clip(str(exc) or type(exc).__name__)}
        return {"watchers": watchers}


async def follow_events(endpoint: str, counter: RestartCounter, ctx: zmq.asyncio.Context) -> None:
    """Feed ``counter`` from circusd's pub/sub ``endpoint`` until cancelled.

    Frames over :data:`MAX_EVENT_BYTES` are refused by ZeroMQ itself
    (``MAXMSGSIZE``), so a hostile publisher cannot grow memory.
    """
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_BYTES)
    sub.setsockopt(zmq.SUBSCRIBE, b"watcher.")
    sub.connect(endpoint)
    try:
        while True:
            event = watcher_event(await sub.recv_multipart())
            if event is not None:
                counter.handle(*event)
    finally:
        sub.close()
