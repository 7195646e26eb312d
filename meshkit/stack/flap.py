"""Flap control: stop a watcher that crash-loops, like an OTP supervisor's restart intensity.

:class:`FlapPolicy` is the rule, with time passed in so it is tested without
sleeping: a watcher whose processes exit abnormally more than
``max_restarts`` times within ``window`` seconds is *tripped*. Exits with
code 0 (graceful stops, scale-downs) do not count.

:class:`FlapGuard` applies it to a running stack (``meshkit flapguard``, one
of the watchers in ``circus.ini``): it follows circusd's event stream, and
when a watcher trips it stops that watcher through :class:`CircusControl`
(serialised and retried, unlike Circus's own flapping plugin, whose
fire-and-forget ``stop`` is dropped whenever circusd is busy), logs an error,
counts ``flap.stopped.<watcher>`` in statsd, and records the fact in
``<run_dir>/flapped.json`` so ``meshkit status`` shows it. The watcher stays
stopped until someone starts it again (``meshkit start WATCHER``), which
also gives it a fresh budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..config import Settings
from ..errors import ConfigError
from ..metrics import Metrics
from ..sections import read_section
from ..untrusted import clip
from .control import CircusControl, StackError
from .exits import watcher_event

log = logging.getLogger("meshkit.flap")

DEFAULT_MAX_RESTARTS = 5
DEFAULT_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class FlapLimit:
    """At most ``max_restarts`` abnormal exits within ``window`` seconds."""

    max_restarts: int = DEFAULT_MAX_RESTARTS
    window: float = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if type(self.max_restarts) is not int or self.max_restarts < 0:
            raise ConfigError(f"flap max_restarts must be an integer >= 0, got {clip(self.max_restarts)}")
        if not isinstance(self.window, (int, float)) or not math.isfinite(self.window) or self.window <= 0:
            raise ConfigError(f"flap window must be a positive number of seconds, got {clip(self.window)}")


@dataclass(frozen=True)
class FlapSection:
    """The flap keys of a ``[services.<watcher>]`` table, as the section loader reads them."""

    flap_max_restarts: int = DEFAULT_MAX_RESTARTS
    flap_window: float = DEFAULT_WINDOW


@dataclass
class FlapPolicy:
    """Counts abnormal exits per watcher and says when one has tripped.

    ``limits`` gives a per-watcher :class:`FlapLimit`; others use ``default``.
    """

    default: FlapLimit = field(default_factory=FlapLimit)
    limits: Mapping[str, FlapLimit] = field(default_factory=dict)
    _exits: dict[str, deque[float]] = field(default_factory=dict)

    def limit(self, watcher: str) -> FlapLimit:
        return self.limits.get(watcher, self.default)

    def record_exit(self, watcher: str, exit_code: int | None, now: float) -> bool:
        """Note one exit at ``now``; True if ``watcher`` has just tripped."""
        if exit_code == 0:
            return False
        limit = self.limit(watcher)
        exits = self._exits.setdefault(watcher, deque())
        exits.append(now)
        while exits and now - exits[0] > limit.window:
            exits.popleft()
        if len(exits) > limit.max_restarts:
            exits.clear()
            return True
        return False

    def reset(self, watcher: str) -> None:
        """Forget a watcher's history (it was started again by hand)."""
        self._exits.pop(watcher, None)

    @classmethod
    def from_settings(cls, settings: Settings, default: FlapLimit | None = None) -> FlapPolicy:
        """Per-watcher limits from ``[services.<name>] flap_max_restarts / flap_window``.

        Each key may also come from ``MESHKIT_<NAME>_FLAP_MAX_RESTARTS`` /
        ``..._FLAP_WINDOW`` (as :meth:`Settings.load` saw them); what a
        watcher's table leaves out is ``default`` (the guard's command line,
        whose own defaults are :data:`DEFAULT_MAX_RESTARTS` and
        :data:`DEFAULT_WINDOW`). Bad values raise :class:`ConfigError`.
        """
        default = default or FlapLimit()
        limits: dict[str, FlapLimit] = {}
        for name, table in settings.service_overrides.items():
            prefix = f"MESHKIT_{name.upper().replace('-', '_')}_"
            found = read_section(FlapSection, table, f"[services.{name}]", env=settings.environment,
                                 env_prefix=prefix, ignore_unknown=True)
            if found:
                limits[name] = FlapLimit(found.get("flap_max_restarts", default.max_restarts),
                                         found.get("flap_window", default.window))
        return cls(default, limits)


def flapped_path(run_dir: str) -> str:
    return os.path.join(run_dir, "flapped.json")


def read_flapped(run_dir: str) -> dict[str, Any]:
    """Watchers stopped by flap control: name → ``{"at": epoch, "exits": n, "window": s}``."""
    try:
        with open(flapped_path(run_dir)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_flapped(run_dir: str, data: Mapping[str, Any]) -> None:
    tmp = flapped_path(run_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(data), f)
    os.replace(tmp, flapped_path(run_dir))


class FlapGuard:
    """Follows circusd's events and stops watchers that trip the policy."""

    def __init__(
        self,
        control: CircusControl,
        pubsub_endpoint: str,
        policy: FlapPolicy,
        run_dir: str,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.pubsub_endpoint = pubsub_endpoint
        self.policy = policy
        self.run_dir = run_dir
        self.metrics = metrics
        self.clock = clock
        self.ignore = {"flapguard"}
        self._running = True

    def handle_event(self, topic: str, data: Mapping[str, Any]) -> None:
        """React to one circusd event (``watcher.<name>.<event>``)."""
        parts = topic.split(".")
        if len(parts) < 3 or parts[0] != "watcher":
            return
        watcher, event = ".".join(parts[1:-1]), parts[-1]
        if watcher in self.ignore:
            return
        if event == "start":
            self.policy.reset(watcher)
            flapped = read_flapped(self.run_dir)
            if flapped.pop(watcher, None) is not None:
                write_flapped(self.run_dir, flapped)
            return
        if event != "reap":
            return
        exit_code = data.get("exit_code")
        if not self.policy.record_exit(watcher, exit_code if isinstance(exit_code, int) else None,
                                       self.clock()):
            return
        limit = self.policy.limit(watcher)
        log.error(
            "FLAPPING: %s exited abnormally more than %d times within %.0fs; stopping it. "
            "Fix the cause, then `meshkit start %s`.", watcher, limit.max_restarts, limit.window,
            watcher, extra={"watcher": watcher, "exit_code": exit_code})
        self.metrics.flap_stopped(watcher)
        try:
            self.control.stop(watcher)
        except StackError as exc:
            log.error("could not stop flapping watcher %s: %s", watcher, exc)
            return
        flapped = read_flapped(self.run_dir)
        flapped[watcher] = {"at": time.time(), "exits": limit.max_restarts + 1, "window": limit.window}
        write_flapped(self.run_dir, flapped)

    def run(self) -> None:
        """Follow events until SIGTERM/SIGINT."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        sub.connect(self.pubsub_endpoint)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        log.info("flap control following %s", self.pubsub_endpoint)
        try:
            while self._running:
                if not sub.poll(500):
                    continue
                event = watcher_event(sub.recv_multipart())
                if event is not None:
                    self.handle_event(*event)
        finally:
            sub.close()
            ctx.term()

    def _stop(self, signum: int, frame: object) -> None:
        self._running = False
