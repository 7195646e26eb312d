"""The panel's state: one refresh loop reading the mesh, Circus and HAProxy, broadcast to every tab.

:class:`Panel` reads everything once per ``refresh`` seconds, whatever the
number of tabs open, so ten engineers watching cost the mesh what one does:
per instance, ``_mesh.stats`` and its recent ``_mesh.spans`` (at most
:data:`MAX_POLLED` instances, :data:`POLL_CONCURRENCY` at a time, each call
bounded by ``call_timeout``), Circus's watchers and HAProxy's servers when
the panel knows the stack's run directory. The result (:meth:`Panel.state`,
a JSON-able dict, described in ``docs/panel.md``) goes into each tab's
:class:`~.feed.SendQueue`.

Spans seen are kept (at most :data:`MAX_SPANS`, oldest forgotten first) so
that the call graph and the list of recent traces outlive one refresh.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .. import names
from ..record import InstanceRecord
from ..untrusted import clip
from .circus import CircusView
from .feed import SendQueue
from .figures import StatsReading, call_edges, method_rows, topology
from .mesh import MeshReader
from .servers import ServersView

log = logging.getLogger("meshkit.panel")

MAX_POLLED = 64  # instances read per refresh; more are listed but not read, and the page says so
POLL_CONCURRENCY = 8
MAX_SPANS = 5000  # spans kept for the call graph and the recent traces (about 2.5 MB at most)
SPANS_PER_INSTANCE = 100
MAX_RECENT_TRACES = 50


@dataclass(eq=False)  # a tab is itself: kept in a set by identity
class Feed:
    """One open tab: its send queue, and whatever it is tapping."""

    queue: SendQueue
    tap: Any = None  # (TapSession, its task) while the tab taps
    socket: Any = None  # the tab's WebSocket, closed when the panel stops
    opened_at: float = field(default_factory=time.monotonic)


class Panel:
    """Reads the mesh (and the stack, when ``circus``/``servers`` are given) and keeps every tab fed."""

    def __init__(self, reader: MeshReader, *, circus: CircusView | None = None,
                 servers: ServersView | None = None, refresh: float = 2.0, call_timeout: float = 1.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reader = reader
        self.circus = circus
        self.servers = servers
        self.refresh = refresh
        self.call_timeout = call_timeout
        self.clock = clock
        self.feeds: set[Feed] = set()
        self._readings: dict[str, StatsReading] = {}
        self._spans: OrderedDict[tuple[str, str], Mapping[str, Any]] = OrderedDict()
        self._state: dict[str, Any] = {"type": "state", "at": None}
        self.refreshes = 0

    def state(self) -> dict[str, Any]:
        """The last state read (``{"type": "state", "at": None}`` before the first refresh)."""
        return self._state

    async def _bounded(self, make: Callable[[], Awaitable[Any]], gate: asyncio.Semaphore) -> Any:
        async with gate:
            return await asyncio.wait_for(make(), self.call_timeout)

    async def _read_instances(self, records: list[InstanceRecord]) -> tuple[list[StatsReading], set[str]]:
        gate = asyncio.Semaphore(POLL_CONCURRENCY)
        reader = self.reader
        stats = await asyncio.gather(*(self._bounded(partial(reader.stats, r), gate) for r in records),
                                     return_exceptions=True)
        spans = await asyncio.gather(
            *(self._bounded(partial(reader.spans, r, limit=SPANS_PER_INSTANCE), gate) for r in records),
            return_exceptions=True)
        now = self.clock()
        readings, unreachable = [], set()
        for record, answer, found in zip(records, stats, spans, strict=True):
            if isinstance(answer, Mapping):
                readings.append(StatsReading(record.service, record.instance_id, now, answer))
            else:
                unreachable.add(record.instance_id)
            if isinstance(found, list):
                self._keep_spans(found)
        return readings, unreachable

    def _keep_spans(self, spans: list[Any]) -> None:
        for span in spans:
            if not isinstance(span, Mapping):
                continue
            key = (str(span.get("trace_id")), str(span.get("span_id")))
            self._spans[key] = span
            self._spans.move_to_end(key)
        while len(self._spans) > MAX_SPANS:
            self._spans.popitem(last=False)

    def recent_traces(self) -> list[dict[str, Any]]:
        """The latest traces seen, newest first: their first span's service, name, duration, status."""
        firsts: dict[str, Mapping[str, Any]] = {}
        failed: set[str] = set()
        for span in self._spans.values():
            trace_id = span.get("trace_id")
            if not isinstance(trace_id, str):
                continue
            if span.get("status") not in (None, "ok"):
                failed.add(trace_id)
            start = span.get("start_unix_us")
            known = firsts.get(trace_id)
            if known is None or (isinstance(start, int) and start < int(known.get("start_unix_us") or 0)):
                firsts[trace_id] = span
        ordered = sorted(firsts.items(), key=lambda item: -int(item[1].get("start_unix_us") or 0))
        return [{"trace_id": t, "service": s.get("service"), "name": s.get("name"),
                 "start_unix_us": s.get("start_unix_us"), "duration_us": s.get("duration_us"),
                 "failed": t in failed} for t, s in ordered[:MAX_RECENT_TRACES]]

    async def refresh_once(self) -> dict[str, Any]:
        """Read everything once, keep it as :meth:`state` and send it to every tab."""
        records = self.reader.instances()
        polled = sorted(records, key=lambda r: (r.service, r.instance_id))[:MAX_POLLED]
        readings, unreachable = await self._read_instances(polled)
        rows = method_rows(readings, self._readings)
        self._readings = {r.instance: r for r in readings}
        state: dict[str, Any] = {
            "type": "state", "at": time.time(),
            "topology": topology(records, unreachable, call_edges(self._spans.values())),
            "methods": rows, "traces": self.recent_traces(),
            "polled": len(polled), "instances": len(records),
            "circus": await asyncio.to_thread(self.circus.read) if self.circus else None,
            "haproxy": await self.servers.read() if self.servers else None,
            "panel": {"tabs": len(self.feeds), "taps": sum(1 for f in self.feeds if f.tap is not None),
                      "dropped": sum(f.queue.dropped_total for f in self.feeds)},
        }
        self._state = state
        self.refreshes += 1
        self.broadcast(state)
        return state

    def broadcast(self, message: Mapping[str, Any]) -> None:
        """Queue ``message`` for every tab (a state replaces the one a slow tab has not taken yet)."""
        frame = json.dumps(message, default=str)
        kind = "state" if message.get("type") == "state" else None
        for feed in list(self.feeds):
            feed.queue.put(frame, kind)

    async def run(self) -> None:
        """Refresh every ``refresh`` seconds until cancelled; a failed refresh is logged and retried."""
        while True:
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("panel refresh failed: %s", clip(str(exc) or type(exc).__name__))
            await asyncio.sleep(self.refresh)  # the refresh period, not a readiness wait

    async def trace(self, trace_id: str) -> dict[str, Any]:
        """``{"trace_id", "spans", "missing"}``: the spans of ``trace_id`` live instances hold, by start."""
        answer = await self.reader.trace(trace_id)
        spans = answer.get("spans")
        missing = answer.get("missing")
        return {"trace_id": trace_id,
                "spans": [s for s in spans if isinstance(s, Mapping)] if isinstance(spans, list) else [],
                "missing": dict(missing) if isinstance(missing, Mapping) else {}}

    async def inspect(self, instance_id: str) -> dict[str, Any]:
        """What one instance says of itself: ``{info, stats, inflight, spans, errors}``.

        ``ValueError`` for an id that is no instance id of the registry's grammar.
        """
        names.validate_instance_id(instance_id)
        return dict(await self.reader.inspect(instance_id))
