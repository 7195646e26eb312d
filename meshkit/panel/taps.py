"""The live flow of one browser tab: taps on the instances, rate-limited at the source, closed with the tab.

:class:`TapFilter` is what a browser may ask for — the same filters as
``meshkit tap``: ``service``, ``method``, ``where`` (metadata equal to a
value, such as a gateway connection's ``conn``), ``errors_only`` and
``min_latency_ms`` — checked field by field (:meth:`TapFilter.from_json`
raises ``ValueError`` with a clipped value on anything else).

A :class:`TapSession` opens a tap with that filter on every matching
instance (and on instances that appear later), polls them, and hands each
event to ``emit``. The session's ``max_rps`` is a budget for all of its
instances together, split evenly among them and enforced by each instance
(``_mesh.tap.open(..., max_rps=...)``), so a busy mesh cannot flood the
panel and the panel cannot load the mesh; each instance's tap also stops by
itself after ``max_events`` or ``ttl_s``. :meth:`TapSession.close` closes
every tap it opened; the panel calls it when the tab's WebSocket closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import names
from ..observe.tap import FILTER_KEYS
from ..observe.tap import TapFilter as InstanceTapFilter
from ..record import InstanceRecord
from ..untrusted import clip
from .mesh import MeshReader

log = logging.getLogger("meshkit.panel.taps")

MAX_WHERE = 8  # metadata conditions in one filter
_META_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_METHOD = re.compile(r"[^\x00-\x20\x7f-\x9f]{1,200}")
MAX_VALUE = 200  # characters of one metadata value
MAX_LATENCY_MS = 3_600_000.0


class TapFilter(InstanceTapFilter):
    """Which calls and pushes a tap reports (empty: all of them): the instance's filter, as a browser sends it."""

    @classmethod
    def from_json(cls, raw: Any) -> TapFilter:
        """Check a filter sent by a browser; ``ValueError`` naming the bad field otherwise."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError(f"a filter is an object, got {clip(raw)}")
        unknown = set(raw) - FILTER_KEYS
        if unknown:
            raise ValueError(f"unknown filter fields: {clip(sorted(map(str, unknown)))}")
        service = raw.get("service") or None
        if service is not None:
            if not isinstance(service, str):
                raise ValueError(f"service must be a name, got {clip(service)}")
            names.validate_service_name(service)
        method = raw.get("method") or None
        if method is not None and (not isinstance(method, str) or not _METHOD.fullmatch(method)):
            raise ValueError(f"method must be a method name, got {clip(method)}")
        return cls(service, method, _where(raw.get("where")), _flag(raw.get("errors_only")),
                   _latency(raw.get("min_latency_ms")))

    def to_json(self) -> dict[str, Any]:
        """The ``filter`` argument of ``_mesh.tap.open`` (only the fields set)."""
        out: dict[str, Any] = {}
        if self.service:
            out["service"] = self.service
        if self.method:
            out["method"] = self.method
        if self.where:
            out["where"] = dict(self.where)
        if self.errors_only:
            out["errors_only"] = True
        if self.min_latency_ms:
            out["min_latency_ms"] = self.min_latency_ms
        return out

    def wants(self, record: InstanceRecord) -> bool:
        """Whether instance ``record`` can serve what this filter asks for."""
        return self.service is None or record.service == self.service


def _where(raw: Any) -> dict[str, str]:
    if raw in (None, {}):
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_WHERE:
        raise ValueError(f"where is an object of at most {MAX_WHERE} KEY: VALUE pairs, got {clip(raw)}")
    where = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            raise ValueError(f"a where key is 1-64 of A-Z a-z 0-9 _ . -, got {clip(key)}")
        if not isinstance(value, str) or len(value) > MAX_VALUE:
            raise ValueError(f"where {key} must be a string of at most {MAX_VALUE} characters, got {clip(value)}")
        where[key] = value
    return where


def _flag(raw: Any) -> bool:
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    raise ValueError(f"errors_only is true or false, got {clip(raw)}")


def _latency(raw: Any) -> float:
    if raw in (None, ""):
        return 0.0
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) \
            or not 0 <= raw <= MAX_LATENCY_MS:
        raise ValueError(f"min_latency_ms is a number of milliseconds 0..{MAX_LATENCY_MS:.0f}, got {clip(raw)}")
    return float(raw)


@dataclass
class _Open:
    record: InstanceRecord
    tap_id: str
    after: int = 0
    dropped: int = 0  # events the instance counted over the rate limit (not sent)


class TapSession:
    """Taps on every matching instance for one browser tab; events go to ``emit`` (a JSON-able dict each)."""

    def __init__(self, reader: MeshReader, tap_filter: TapFilter, emit: Callable[[dict[str, Any]], None], *,
                 max_rps: float = 20.0, max_events: int = 10_000, ttl_s: float = 600.0,
                 poll_interval: float = 0.25) -> None:
        self.reader = reader
        self.filter = tap_filter
        self.emit = emit
        self.max_rps = max_rps
        self.max_events = max_events
        self.ttl_s = ttl_s
        self.poll_interval = poll_interval
        self.open: dict[str, _Open] = {}  # instance id -> its tap
        self.finished: set[str] = set()  # instances whose tap closed by itself: not reopened
        self.events = 0
        self.closed = False

    def per_instance_rps(self, count: int) -> float:
        """Each instance's share of the session's budget (at least 1 event per second)."""
        return max(1.0, self.max_rps / max(1, count))

    async def sync(self) -> None:
        """Open taps on matching instances that have none yet; forget instances that left."""
        wanted = {r.instance_id: r for r in self.reader.instances() if self.filter.wants(r) and r.is_up}
        for gone in set(self.open) - set(wanted):
            del self.open[gone]  # its process stopped: its tap went with it
        share = self.per_instance_rps(len(wanted))
        for instance, record in wanted.items():
            if instance in self.open or instance in self.finished or self.closed:
                continue
            try:
                tap_id = await self.reader.tap_open(record, self.filter.to_json(), share,
                                                    self.max_events, self.ttl_s)
            except Exception as exc:
                log.debug("tap on %s not opened: %s", instance, clip(str(exc)))
                continue
            self.open[instance] = _Open(record, str(tap_id))

    async def poll_once(self) -> None:
        """Poll every open tap once and emit what it caught."""
        for instance, tap in list(self.open.items()):
            try:
                answer = await self.reader.tap_poll(tap.record, tap.tap_id, tap.after)
            except Exception as exc:
                log.debug("tap on %s not polled: %s", instance, clip(str(exc)))
                continue
            events = answer.get("events") if isinstance(answer, Mapping) else None
            for event in events if isinstance(events, list) else []:
                if isinstance(event, Mapping):
                    self.events += 1
                    self.emit({"type": "event", "instance": instance, "event": dict(event)})
            after = answer.get("next") if isinstance(answer, Mapping) else None
            if isinstance(after, int) and not isinstance(after, bool):
                tap.after = after
            dropped = answer.get("dropped") if isinstance(answer, Mapping) else None
            if isinstance(dropped, int) and not isinstance(dropped, bool) and dropped > tap.dropped:
                tap.dropped = dropped
                self.emit({"type": "tap", "state": "limited", "instance": instance, "dropped": dropped})
            if isinstance(answer, Mapping) and answer.get("closed") is True:
                self.open.pop(instance, None)
                self.finished.add(instance)
                self.emit({"type": "tap", "state": "instance-closed", "instance": instance})

    async def run(self) -> None:
        """Sync and poll until :meth:`close` (or cancellation); closes every tap on the way out."""
        try:
            while not self.closed:
                await self.sync()
                await self.poll_once()
                await asyncio.sleep(self.poll_interval)  # the poll period, not a readiness wait
        finally:
            await self.close()

    async def close(self) -> None:
        """Close every tap this session opened (best effort: an instance gone took its tap along)."""
        self.closed = True
        taps, self.open = list(self.open.values()), {}
        for tap in taps:
            try:
                await self.reader.tap_close(tap.record, tap.tap_id)
            except Exception as exc:
                log.debug("tap %s not closed: %s", clip(tap.tap_id), clip(str(exc)))

    def describe(self) -> str:
        return json.dumps(self.filter.to_json())
