"""Taps: live streams of the calls and pushes an instance serves, safe by construction.

``_mesh.tap.open(filter, max_rps, max_events, ttl_s)`` opens a :class:`Tap`
and answers its id; ``_mesh.tap.poll(tap_id, after)`` answers
``{"events": [...], "next": seq, "closed": bool}``; ``_mesh.tap.close``.

The safety model is Erlang's ``recon_trace`` and ``linkerd viz tap --max-rps``:

* **rate-limited at the source**: a token bucket of ``max_rps`` events per
  second per tap (at most :data:`MAX_RPS`); what does not fit is counted in
  ``dropped``, never queued;
* **bounded**: at most :data:`QUEUE_EVENTS` events wait between two polls
  (older ones are dropped first), each event's arguments and metadata
  clipped, at most ``ObserveOptions.max_taps`` taps per instance;
* **self-closing**: after ``max_events`` events, after ``ttl_s`` seconds, or
  when not polled for :data:`IDLE_CLOSE_S` seconds.

A filter is ``{service?, method?, where: {key: value}, errors_only, min_latency_ms}``;
``where`` matches the call's metadata (a gateway connection's ``login``, a
``customer`` id passed as metadata) exactly. Metadata keys marked sensitive
never leave the instance.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..untrusted import clip

MAX_RPS = 1000
MAX_EVENTS = 100_000
MAX_TTL_S = 3600.0
QUEUE_EVENTS = 256  # events waiting between two polls of one tap
IDLE_CLOSE_S = 5.0
CLOSED_KEPT = 64  # ids of closed taps remembered, so a late poll says "closed" rather than "unknown"
MAX_META_KEYS = 16
MAX_META_TEXT = 128
MAX_ARGS_TEXT = 256
#: The members a tap filter may have (the fields of :class:`TapFilter`).
FILTER_KEYS = frozenset({"service", "method", "where", "errors_only", "min_latency_ms"})


class TapError(ValueError):
    """A tap request the instance refuses: a bad filter, too many taps, an unknown id (``bad_arguments``)."""


@dataclass(frozen=True)
class TapFilter:
    """Which events a tap wants (see the module doc)."""

    service: str | None = None
    method: str | None = None
    where: Mapping[str, str] = field(default_factory=dict)
    errors_only: bool = False
    min_latency_ms: float = 0.0

    @classmethod
    def parse(cls, raw: Any) -> TapFilter:
        """A filter from its wire form; :class:`TapError` for anything else."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise TapError("a tap filter must be a map")
        unknown = set(raw) - FILTER_KEYS
        if unknown:
            raise TapError(f"unknown tap filter keys {clip(sorted(map(str, unknown)))}")
        where = raw.get("where") or {}
        if not isinstance(where, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in where.items()):
            raise TapError("a tap filter's where must map strings to strings")
        for key in ("service", "method"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise TapError(f"a tap filter's {key} must be a string")
        latency = raw.get("min_latency_ms", 0) or 0
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
            raise TapError("min_latency_ms must be a number of at least 0")
        return cls(raw.get("service"), raw.get("method"), dict(where), bool(raw.get("errors_only")),
                   float(latency))

    def matches(self, service: str, method: str, meta: Mapping[str, str], status: str,
                duration_us: int) -> bool:
        if self.service is not None and service != self.service:
            return False
        if self.method is not None and method != self.method:
            return False
        if self.errors_only and status == "ok":
            return False
        if duration_us < self.min_latency_ms * 1000:
            return False
        return all(meta.get(k) == v for k, v in self.where.items())


class Tap:
    """One open tap: its filter, token bucket, queue and limits."""

    def __init__(self, tap_id: str, flt: TapFilter, max_rps: float, max_events: int, ttl_s: float,
                 now: float) -> None:
        self.id = tap_id
        self.filter = flt
        self.max_rps = max_rps
        self.max_events = max_events
        self.expires = now + ttl_s
        self.last_poll = now
        self.tokens = max_rps
        self.refilled = now
        self.sent = 0  # events accepted so far
        self.dropped = 0  # events refused by the rate limit or pushed out of the queue
        self.queue: deque[dict[str, Any]] = deque()
        self.seq = itertools.count(1)
        self.closed = False

    def admit(self, now: float) -> bool:
        """Take a token if one is there (the rate limit)."""
        self.tokens = min(self.max_rps, self.tokens + (now - self.refilled) * self.max_rps)
        self.refilled = now
        if self.tokens < 1:
            self.dropped += 1
            return False
        self.tokens -= 1
        return True

    def push(self, event: dict[str, Any]) -> None:
        self.sent += 1
        self.queue.append({**event, "seq": next(self.seq)})
        if len(self.queue) > QUEUE_EVENTS:
            self.queue.popleft()
            self.dropped += 1
        if self.sent >= self.max_events:
            self.closed = True


class TapSet:
    """The taps open on one instance (at most ``max_taps``); ``now`` is a monotonic clock."""

    def __init__(self, max_taps: int, hidden_keys: frozenset[str],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.max_taps = max_taps
        self.hidden = hidden_keys
        self.now = now
        self.taps: dict[str, Tap] = {}
        self._closed: deque[str] = deque(maxlen=CLOSED_KEPT)

    def __bool__(self) -> bool:
        return bool(self.taps)

    def open(self, filter: Any = None, max_rps: float = 20, max_events: int = 1000,  # "filter": the wire name
             ttl_s: float = 60) -> str:
        """Open a tap; its id. :class:`TapError` for bad limits or when ``max_taps`` are open."""
        flt = TapFilter.parse(filter)
        for name, value, top in (("max_rps", max_rps, MAX_RPS), ("max_events", max_events, MAX_EVENTS),
                                 ("ttl_s", ttl_s, MAX_TTL_S)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top:
                raise TapError(f"{name} must be a number in (0, {top}], got {clip(repr(value))}")
        self.sweep()
        if len(self.taps) >= self.max_taps:
            raise TapError(f"this instance already has {len(self.taps)} taps open (max_taps)")
        tap_id = f"{random.getrandbits(64):016x}"
        self.taps[tap_id] = Tap(tap_id, flt, float(max_rps), int(max_events), float(ttl_s), self.now())
        return tap_id

    def poll(self, tap_id: str, after: int = 0) -> dict[str, Any]:
        """Events after sequence number ``after`` (they are then forgotten), and whether the tap closed."""
        self.sweep()
        tap = self.taps.get(tap_id)
        if tap is None:
            if tap_id in self._closed:
                return {"events": [], "next": after, "closed": True, "dropped": 0}
            raise TapError(f"no tap {clip(str(tap_id))!r} on this instance")
        tap.last_poll = self.now()
        while tap.queue and tap.queue[0]["seq"] <= after:
            tap.queue.popleft()
        events = list(tap.queue)
        tap.queue.clear()
        last = events[-1]["seq"] if events else after
        if tap.closed:
            self._forget(tap_id)
        return {"events": events, "next": last, "closed": tap.closed, "dropped": tap.dropped}

    def close(self, tap_id: str) -> bool:
        """Close ``tap_id``; whether it was open."""
        return self._forget(tap_id)

    def _forget(self, tap_id: str) -> bool:
        found = self.taps.pop(tap_id, None) is not None
        if found:
            self._closed.append(tap_id)
        return found

    def sweep(self) -> None:
        """Close taps past their time or not polled for :data:`IDLE_CLOSE_S` seconds."""
        now = self.now()
        for tap in list(self.taps.values()):
            idle = now - tap.last_poll > IDLE_CLOSE_S
            if now >= tap.expires:
                tap.closed = True
            if idle or (tap.closed and not tap.queue):  # nobody reads an idle tap's queue
                self._forget(tap.id)

    def offer(self, service: str, method: str, meta: Mapping[str, str], status: str, duration_us: int,
              make: Callable[[], dict[str, Any]], args: Any = None) -> None:
        """Give every matching open tap the event ``make()`` builds (built at most once, only if wanted)."""
        now = self.now()
        event: dict[str, Any] | None = None
        for tap in list(self.taps.values()):
            if tap.closed or now >= tap.expires or now - tap.last_poll > IDLE_CLOSE_S:
                tap.closed = True
                continue
            if not tap.filter.matches(service, method, meta, status, duration_us) or not tap.admit(now):
                continue
            if event is None:
                event = make()
                event["meta"] = self.visible(meta)
                if args is not None:
                    event["args"] = clip(repr(args), MAX_ARGS_TEXT)
            tap.push(event)

    def visible(self, meta: Mapping[str, str]) -> dict[str, str]:
        """``meta`` without its sensitive keys, clipped, at most :data:`MAX_META_KEYS` keys."""
        out: dict[str, str] = {}
        for key, value in meta.items():
            if key.lower() in self.hidden:
                continue
            if len(out) >= MAX_META_KEYS:
                break
            out[clip(key, MAX_META_TEXT)] = clip(str(value), MAX_META_TEXT)
        return out
