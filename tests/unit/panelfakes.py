"""A fake mesh for the panel's unit tests: records, canned ``_mesh.*`` answers, taps that remember."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshkit.record import InstanceRecord


def record(service: str, instance: str, host: str = "h1", state: str = "up") -> InstanceRecord:
    return InstanceRecord(service=service, instance_id=instance, endpoint="tcp://127.0.0.1:1", host=host,
                          pid=100, state=state, started_at=1000.0)


class FakeReader:
    """A :class:`meshkit.panel.mesh.MeshReader` whose answers the test sets."""

    def __init__(self, *records: InstanceRecord) -> None:
        self.records = list(records)
        self.stats_of: dict[str, Any] = {}  # instance -> answer, or an exception to raise
        self.spans_of: dict[str, list[Mapping[str, Any]]] = {}
        self.trace_spans: list[Mapping[str, Any]] = []
        self.opened: list[tuple[str, dict[str, Any], float]] = []  # (instance, filter, max_rps)
        self.closed: list[str] = []  # tap ids
        self.pending: dict[str, list[dict[str, Any]]] = {}  # tap id -> events not yet polled
        self.tap_closed: set[str] = set()  # tap ids that report closed=True on their next poll
        self.polls: list[tuple[str, int]] = []
        self.dropped: dict[str, int] = {}  # tap id -> events it says it dropped over its rate limit

    def instances(self) -> list[InstanceRecord]:
        return list(self.records)

    async def stats(self, record: InstanceRecord) -> Mapping[str, Any]:
        answer = self.stats_of.get(record.instance_id, {})
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def spans(self, record: InstanceRecord, trace_id: str | None = None,
                    limit: int = 200) -> list[Mapping[str, Any]]:
        return self.spans_of.get(record.instance_id, [])[:limit]

    async def trace(self, trace_id: str) -> Mapping[str, Any]:
        return {"spans": [s for s in self.trace_spans if s.get("trace_id") == trace_id], "missing": {}}

    async def inspect(self, instance_id: str) -> Mapping[str, Any]:
        return {"info": {"instance": instance_id}, "stats": {}, "inflight": [], "spans": [], "errors": []}

    async def tap_open(self, record: InstanceRecord, filter: Mapping[str, Any], max_rps: float,
                       max_events: int, ttl_s: float) -> str:
        tap_id = f"tap-{record.instance_id}-{len(self.opened)}"
        self.opened.append((record.instance_id, dict(filter), max_rps))
        self.pending[tap_id] = []
        return tap_id

    def offer(self, instance: str, event: dict[str, Any]) -> None:
        """Queue ``event`` on every open tap of ``instance``."""
        for tap_id, events in self.pending.items():
            if tap_id.startswith(f"tap-{instance}-") and tap_id not in self.closed:
                events.append(event)

    async def tap_poll(self, record: InstanceRecord, tap_id: str, after: int) -> Mapping[str, Any]:
        self.polls.append((tap_id, after))
        events, self.pending[tap_id] = self.pending.get(tap_id, []), []
        return {"events": events, "next": after + len(events), "closed": tap_id in self.tap_closed,
                "dropped": self.dropped.get(tap_id, 0)}

    async def tap_close(self, record: InstanceRecord, tap_id: str) -> None:
        self.closed.append(tap_id)


def span(trace: str, span_id: str, parent: str | None, service: str, kind: str = "server",
         start: int = 0, duration: int = 10, status: str = "ok") -> dict[str, Any]:
    return {"trace_id": trace, "span_id": span_id, "parent_id": parent, "service": service,
            "instance": service + "-1", "host": "h1", "name": f"{service}.m", "kind": kind,
            "start_unix_us": start, "duration_us": duration, "status": status, "attrs": {}}
