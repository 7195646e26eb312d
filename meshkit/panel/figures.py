"""What the page draws, computed from what the collectors read: pure functions of data and time.

* :func:`method_rows` — per service and method: calls/s and errors/s between
  two readings of every instance's ``_mesh.stats``, p50/p99 from the summed
  latency buckets of that interval (of all time when nothing was called in
  it), calls in flight now, the last error;
* :func:`call_edges` — who calls whom, from spans: a span whose parent span
  belongs to another service is one call from that service to this one;
* :func:`topology` — services, their instances grouped by host with state,
  and the edges.

Every input came from a remote peer (a stats answer, a span, a registry
record): anything of the wrong type is skipped, never trusted, never raised
on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..record import InstanceRecord

MAX_EDGES = 500  # caller→callee pairs kept for the drawing
_EDGE_KINDS = {None: "call", "server": "call", "consumer": "push"}  # span kind of the receiving side


@dataclass(frozen=True)
class StatsReading:
    """One instance's ``_mesh.stats`` answer and when it was read (a monotonic time, seconds)."""

    service: str
    instance: str
    at: float
    stats: Mapping[str, Any]


def quantile_us(buckets: Sequence[int], bounds: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) in µs: the upper bound of the bucket it falls in.

    ``buckets[i]`` counts latencies in ``[bounds[i], bounds[i+1])``; the last
    bucket is open, so a quantile there is 10 times its lower bound. None when the
    histogram is empty.
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if n and seen >= rank:
            return float(bounds[i + 1] if i + 1 < len(bounds) else bounds[i] * 10)
    return float(bounds[-1] * 10)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _errors(value: Any) -> int:
    """Errors as a count: ``_mesh.stats`` gives ``{code: n}``; a bare count is accepted too."""
    if isinstance(value, Mapping):
        return sum(_int(n) for n in value.values())
    return _int(value)


def _buckets(value: Any, size: int) -> list[int]:
    if not isinstance(value, list):
        return [0] * size
    return ([_int(n) for n in value] + [0] * size)[:size]


@dataclass
class _Sum:
    calls: int = 0
    errors: int = 0
    calls_delta: int = 0
    errors_delta: int = 0
    seconds: float = 0.0
    in_flight: int = 0
    instances: int = 0
    buckets: list[int] = field(default_factory=list)
    delta_buckets: list[int] = field(default_factory=list)
    last_error: Any = None
    last_error_at: float = -1.0


def _methods(reading: StatsReading) -> dict[tuple[str, str], Mapping[str, Any]]:
    """``(kind, name) -> counters``: ``call`` for the ``methods`` table, ``push`` for ``pushes`` (topics)."""
    found: dict[tuple[str, str], Mapping[str, Any]] = {}
    for kind, table in (("call", "methods"), ("push", "pushes")):
        entries = reading.stats.get(table)
        if isinstance(entries, Mapping):
            found.update({(kind, str(k)): v for k, v in entries.items() if isinstance(v, Mapping)})
    return found


def _bounds(readings: Iterable[StatsReading]) -> list[int]:
    for reading in readings:
        bounds = reading.stats.get("bucket_bounds_us")
        if isinstance(bounds, list) and bounds and all(_int(b) == b for b in bounds):
            return [int(b) for b in bounds]
    return [0, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000]


def method_rows(current: Sequence[StatsReading], previous: Mapping[str, StatsReading]) -> list[dict[str, Any]]:
    """One row per (service, kind, method or topic), summed over the instances in ``current``.

    ``kind`` is ``call`` (a method served) or ``push`` (a topic received).
    ``previous`` maps an instance id to its reading one refresh earlier; an
    instance without one (new, or restarted: its counters went down)
    contributes to the totals but not to the rates. Rows are sorted by
    service, kind, then method.
    """
    bounds = _bounds(current)
    size = len(bounds)
    sums: dict[tuple[str, str, str], _Sum] = {}
    for reading in current:
        before = previous.get(reading.instance)
        old = _methods(before) if before is not None else {}
        for name, now in _methods(reading).items():
            row = sums.setdefault((reading.service, *name), _Sum(buckets=[0] * size, delta_buckets=[0] * size))
            calls, errors = _int(now.get("calls")), _errors(now.get("errors"))
            buckets = _buckets(now.get("buckets"), size)
            row.calls += calls
            row.errors += errors
            row.in_flight += _int(now.get("in_flight"))
            row.instances += 1
            row.buckets = [a + b for a, b in zip(row.buckets, buckets, strict=True)]
            last = now.get("last_error")
            if isinstance(last, Mapping):
                at = last.get("unix")
                at_f = float(at) if isinstance(at, (int, float)) else 0.0
                if at_f >= row.last_error_at:
                    row.last_error, row.last_error_at = dict(last), at_f
            was = old.get(name)
            if before is None or was is None or _int(was.get("calls")) > calls:
                continue
            dt = reading.at - before.at
            if dt <= 0:
                continue
            row.calls_delta += calls - _int(was.get("calls"))
            row.errors_delta += max(0, errors - _errors(was.get("errors")))
            row.seconds = max(row.seconds, dt)
            old_buckets = _buckets(was.get("buckets"), size)
            row.delta_buckets = [a + max(0, b - c) for a, b, c in
                                 zip(row.delta_buckets, buckets, old_buckets, strict=True)]
    rows = []
    for (service, kind, method), s in sorted(sums.items()):
        latency = s.delta_buckets if sum(s.delta_buckets) else s.buckets
        rows.append({
            "service": service, "kind": kind, "method": method, "instances": s.instances,
            "calls": s.calls, "errors": s.errors, "in_flight": s.in_flight,
            "rate": s.calls_delta / s.seconds if s.seconds else None,
            "error_rate": s.errors_delta / s.seconds if s.seconds else None,
            "p50_us": quantile_us(latency, bounds, 0.5),
            "p99_us": quantile_us(latency, bounds, 0.99),
            "last_error": s.last_error,
        })
    return rows


def call_edges(spans: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Caller → callee service pairs with how many calls (or pushes) the spans show, most first.

    A call is counted once, at its server span (a push at its consumer span:
    ``kind`` ``push``), the span whose parent is a span of another service
    (the caller's client span, or its server span when the caller recorded
    no client span); ``errors`` counts those whose status is not ``ok``.
    Spans whose parent is not among ``spans`` (a caller outside the mesh, or
    one whose buffer forgot it) draw no edge.
    """
    spans = [s for s in spans if isinstance(s, Mapping)]
    service_of = {s.get("span_id"): s.get("service") for s in spans if isinstance(s.get("span_id"), str)}
    counts: dict[tuple[str, str, str], int] = {}
    failed: dict[tuple[str, str, str], int] = {}
    seen: set[tuple[str, str]] = set()
    for span in spans:
        parent = span.get("parent_id")
        callee = span.get("service")
        caller = service_of.get(parent) if isinstance(parent, str) else None
        if not isinstance(caller, str) or not isinstance(callee, str) or caller == callee:
            continue
        raw_kind = span.get("kind")
        kind = _EDGE_KINDS.get(raw_kind) if raw_kind is None or isinstance(raw_kind, str) else None
        if kind is None:
            continue
        key = (str(span.get("trace_id")), str(span.get("span_id")))
        if key in seen:
            continue  # the same span read twice (two refreshes overlap)
        seen.add(key)
        counts[(caller, callee, kind)] = counts.get((caller, callee, kind), 0) + 1
        if span.get("status") not in (None, "ok"):
            failed[(caller, callee, kind)] = failed.get((caller, callee, kind), 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:MAX_EDGES]
    return [{"from": a, "to": b, "kind": k, "calls": n, "errors": failed.get((a, b, k), 0)}
            for (a, b, k), n in ordered]


def topology(records: Iterable[InstanceRecord], unreachable: Iterable[str],
             edges: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Services → hosts → instances (id, pid, state, version, age base), plus the call edges.

    ``unreachable`` names instance ids that did not answer the last
    introspection call: their state shows as ``unreachable`` whatever their
    record says (a record outlives a killed process by up to its TTL).
    """
    dead = set(unreachable)
    services: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rec in sorted(records, key=lambda r: (r.service, r.host, r.instance_id)):
        hosts = services.setdefault(rec.service, {})
        hosts.setdefault(rec.host, []).append({
            "instance": rec.instance_id, "pid": rec.pid, "host": rec.host, "endpoint": rec.endpoint,
            "version": rec.version, "started_at": rec.started_at,
            "state": "unreachable" if rec.instance_id in dead else rec.state,
            "listeners": dict(rec.listeners),
        })
    for edge in edges:
        for end in (edge.get("from"), edge.get("to")):
            if isinstance(end, str):
                services.setdefault(end, {})  # a caller seen in spans whose instances are gone
    return {
        "services": [{"name": name, "hosts": [{"host": h, "instances": insts} for h, insts in hosts.items()]}
                     for name, hosts in sorted(services.items())],
        "edges": list(edges),
    }
