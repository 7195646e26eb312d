"""Asking the mesh about itself: the async API behind ``meshkit trace|inspect|stats|tap`` and the panel.

Every function takes a started :class:`~meshkit.AsyncClient` and asks live
instances their reserved ``_mesh.*`` methods (:mod:`.introspect`) with
:meth:`~meshkit.AsyncClient.call_instance`, concurrently; an instance that
does not answer within ``timeout`` is reported in ``missing`` (or skipped),
never fatal.

* :func:`instances` — the registry records (as dicts), optionally of one service;
* :func:`info` — ``_mesh.info`` of one instance;
* :func:`stats` — per-method stats summed across a service's instances (or all),
  with rates since the previous call of the same :class:`StatsSampler` and
  p50/p99 from the buckets;
* :func:`trace` — every span of a trace, from every live instance, as a tree;
* :func:`slow_or_failed` — recent slow or failed traces of a service;
* :func:`recent` — the newest spans everywhere, and who calls whom;
* :class:`Tap` — an async iterator over tap events from many instances.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CallError
from ..record import InstanceRecord
from .stats import quantile


class _InstanceView(Protocol):
    def instances(self, service: str | None = None) -> list[InstanceRecord]: ...


class AsyncClient(Protocol):
    """What these queries use of a started :class:`meshkit.AsyncClient`.

    A protocol rather than the class, so this package (which the client
    imports for its observer) does not import the client back.
    """

    @property
    def registry(self) -> _InstanceView: ...

    async def call_instance(self, instance_id: str, method: str, *args: Any,
                            timeout: float | None = None, **kwargs: Any) -> Any: ...

ASK_TIMEOUT = 2.0  # seconds one instance may take to answer a reserved method


def _records(client: AsyncClient, service: str | None) -> list[InstanceRecord]:
    return [r for r in client.registry.instances(service) if not r.service.startswith("_")]


async def instances(client: AsyncClient, service: str | None = None) -> list[dict[str, Any]]:
    """The instances the registry lists (of ``service``, or all): service, instance, host, pid, state, ..."""
    return [{"service": r.service, "instance": r.instance_id, "endpoint": r.endpoint, "host": r.host,
             "pid": r.pid, "version": r.version, "state": r.state, "started_unix": r.started_at,
             "methods": list(r.methods), "topics": list(r.topics)}
            for r in _records(client, service)]


async def ask(client: AsyncClient, instance_id: str, method: str, *args: Any,
              timeout: float = ASK_TIMEOUT, **kwargs: Any) -> Any:
    """One reserved method of one instance (``method`` without the ``_mesh.`` prefix)."""
    return await client.call_instance(instance_id, f"_mesh.{method}", *args, timeout=timeout, **kwargs)


async def ask_all(client: AsyncClient, records: Iterable[InstanceRecord], method: str, *args: Any,
                  timeout: float = ASK_TIMEOUT, **kwargs: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``method`` of every instance in ``records`` at once: ``({instance: answer}, {instance: error})``."""
    records = list(records)

    async def one(record: InstanceRecord) -> Any:
        return await ask(client, record.instance_id, method, *args, timeout=timeout, **kwargs)

    results = await asyncio.gather(*(one(r) for r in records), return_exceptions=True)
    answers: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for record, result in zip(records, results, strict=True):
        if isinstance(result, CallError):
            missing[record.instance_id] = f"{result.code}: {result.message}"
        elif isinstance(result, BaseException):
            raise result
        else:
            answers[record.instance_id] = result
    return answers, missing


async def info(client: AsyncClient, instance_id: str) -> dict[str, Any]:
    """``_mesh.info`` of ``instance_id`` (see :func:`meshkit.observe.introspect.describe`)."""
    result: dict[str, Any] = await ask(client, instance_id, "info")
    return result


async def inspect_instance(client: AsyncClient, instance_id: str, spans: int = 20) -> dict[str, Any]:
    """Everything ``meshkit inspect`` shows: ``{info, stats, inflight, spans, errors}`` of one instance."""
    got = await asyncio.gather(ask(client, instance_id, "info"), ask(client, instance_id, "stats"),
                               ask(client, instance_id, "inflight"),
                               ask(client, instance_id, "spans", limit=spans),
                               ask(client, instance_id, "spans", select="errors", limit=spans))
    return dict(zip(("info", "stats", "inflight", "spans", "errors"), got, strict=True))


@dataclass
class StatsSampler:
    """Remembers the previous sample so :func:`stats` can report rates (calls per second)."""

    previous: dict[tuple[str, str, str], int] = field(default_factory=dict)
    at: float = 0.0


async def stats(client: AsyncClient, service: str | None = None, sampler: StatsSampler | None = None,
                timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """Per-method stats summed across instances.

    Answers ``{"methods": [{service, method, kind ("call"|"push"), instances,
    calls, errors, error_rate, in_flight, p50_us, p99_us, rate, error_by_code,
    last_error}], "instances": n, "missing": {instance: why}}``, sorted by
    service then method. ``rate`` (per second) needs a ``sampler`` that has
    seen a previous sample; otherwise it is ``None``.
    """
    records = _records(client, service)
    answers, missing = await ask_all(client, records, "stats", timeout=timeout)
    service_of = {r.instance_id: r.service for r in records}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for instance_id, answer in answers.items():
        for kind, table in (("call", answer.get("methods", {})), ("push", answer.get("pushes", {}))):
            for name, c in table.items():
                key = (service_of[instance_id], kind, name)
                row = rows.setdefault(key, {"service": key[0], "method": name, "kind": kind, "instances": 0,
                                            "calls": 0, "errors": 0, "in_flight": 0, "error_by_code": {},
                                            "buckets": [0] * len(c["buckets"]), "last_error": None})
                row["instances"] += 1
                row["calls"] += c["calls"]
                row["in_flight"] += c["in_flight"]
                for code, n in c["errors"].items():
                    row["error_by_code"][code] = row["error_by_code"].get(code, 0) + n
                    row["errors"] += n
                row["buckets"] = [a + b for a, b in zip(row["buckets"], c["buckets"], strict=True)]
                last = c.get("last_error")
                if last and (row["last_error"] is None or last["unix"] > row["last_error"]["unix"]):
                    row["last_error"] = last
    now = time.monotonic()
    for key, row in rows.items():
        row["error_rate"] = row["errors"] / row["calls"] if row["calls"] else 0.0
        row["p50_us"] = quantile(row["buckets"], 0.5)
        row["p99_us"] = quantile(row["buckets"], 0.99)
        row["rate"] = None
        if sampler is not None and sampler.at and key in sampler.previous and now > sampler.at:
            row["rate"] = max(0.0, (row["calls"] - sampler.previous[key]) / (now - sampler.at))
    if sampler is not None:
        sampler.previous = {k: r["calls"] for k, r in rows.items()}
        sampler.at = now
    return {"methods": [rows[k] for k in sorted(rows)], "instances": len(records), "missing": missing}


def build_tree(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spans as a forest: each span dict gets ``children`` (by start time); roots are spans whose parent is unknown.

    Duplicates (the same span from two answers) are merged by ``span_id``.
    """
    by_id: dict[str, dict[str, Any]] = {}
    for span in spans:
        by_id.setdefault(span["span_id"], {**span, "children": []})
    roots: list[dict[str, Any]] = []
    for span in by_id.values():
        parent = by_id.get(span["parent_id"] or "")
        (parent["children"] if parent is not None and parent is not span else roots).append(span)
    for span in by_id.values():
        span["children"].sort(key=lambda s: s["start_unix_us"])
    roots.sort(key=lambda s: s["start_unix_us"])
    return roots


async def trace(client: AsyncClient, trace_id: str, timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """Every span of ``trace_id`` kept by any live instance: ``{trace_id, spans, tree, missing}``.

    ``spans`` is flat (by start), ``tree`` is :func:`build_tree` of them.
    """
    answers, missing = await ask_all(client, _records(client, None), "spans", trace_id=trace_id,
                                     limit=2000, timeout=timeout)
    merged: dict[str, dict[str, Any]] = {}
    for found in answers.values():
        for span in found:
            merged.setdefault(span["span_id"], span)
    spans = sorted(merged.values(), key=lambda s: s["start_unix_us"])
    return {"trace_id": trace_id, "spans": spans, "tree": build_tree(spans), "missing": missing}


async def recent(client: AsyncClient, service: str | None = None, limit: int = 200,
                 timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """The newest spans of every live instance (of ``service``, or all): ``{spans, calls, missing}``.

    ``calls`` is who calls whom, drawn from the client spans: ``[{from, to,
    calls, errors}]`` (``to`` is the service a client span named) — the
    topology a panel draws.
    """
    answers, missing = await ask_all(client, _records(client, service), "spans", limit=limit, timeout=timeout)
    spans = sorted((s for found in answers.values() for s in found), key=lambda s: s["start_unix_us"])
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    for span in spans:
        if span["kind"] == "client" and "." in span["name"]:
            key = (span["service"], span["name"].split(".", 1)[0])
            edge = edges.setdefault(key, {"from": key[0], "to": key[1], "calls": 0, "errors": 0})
            edge["calls"] += 1
            edge["errors"] += span["status"] != "ok"
    return {"spans": spans, "calls": [edges[k] for k in sorted(edges)], "missing": missing}


async def slow_or_failed(client: AsyncClient, service: str, select: str, limit: int = 20,
                         timeout: float = ASK_TIMEOUT) -> list[dict[str, Any]]:
    """The slowest (``select="slow"``) or latest failed (``"errors"``) server spans of ``service``.

    One entry per trace (its worst span of that service), slowest or newest
    first; each is a span dict, whose ``trace_id`` :func:`trace` expands.
    """
    if select not in ("slow", "errors"):
        raise ValueError("select must be 'slow' or 'errors'")
    answers, _ = await ask_all(client, _records(client, service), "spans", select=select, service=service,
                               limit=max(limit, 50), timeout=timeout)
    best: dict[str, dict[str, Any]] = {}
    for found in answers.values():
        for span in found:
            if select == "errors" and span["kind"] not in ("server", "consumer"):
                continue
            seen = best.get(span["trace_id"])
            if seen is None or span["duration_us"] > seen["duration_us"]:
                best[span["trace_id"]] = span
    order = "duration_us" if select == "slow" else "start_unix_us"
    return sorted(best.values(), key=lambda s: s[order], reverse=True)[:limit]


class Tap:
    """A live tap on every instance of a service (or all): ``async for event in tap``; then :meth:`close`.

    ``filter`` is the tap filter of :mod:`.tap` (``service`` is added from
    ``service``); ``max_rps`` is per instance. Instances that appear later are
    not tapped; instances that close their tap (count, time) are left; the
    iteration ends when every tap has closed. Each event is a span dict with
    ``meta`` (sensitive keys removed), ``args`` (clipped), ``seq`` and
    ``instance``.
    """

    def __init__(self, client: AsyncClient, service: str | None = None, filter: dict[str, Any] | None = None,
                 max_rps: float = 20, max_events: int = 1000, ttl_s: float = 60,
                 poll_interval: float = 0.2) -> None:
        self.client = client
        self.service = service
        self.filter = dict(filter or {})
        if service is not None:
            self.filter.setdefault("service", service)
        self.max_rps = max_rps
        self.max_events = max_events
        self.ttl_s = ttl_s
        self.poll_interval = poll_interval
        self.taps: dict[str, tuple[str, int]] = {}  # instance -> (tap id, last seq)
        self.missing: dict[str, str] = {}
        self.dropped: dict[str, int] = {}
        self._opened = False

    async def open(self) -> None:
        """Open a tap on every live instance (done by the first iteration if not before)."""
        self._opened = True
        records = [r for r in _records(self.client, self.service) if r.is_up]
        answers, self.missing = await ask_all(self.client, records, "tap.open", filter=self.filter,
                                              max_rps=self.max_rps, max_events=self.max_events,
                                              ttl_s=self.ttl_s)
        self.taps = {instance: (tap_id, 0) for instance, tap_id in answers.items()}

    async def poll(self) -> list[dict[str, Any]]:
        """New events from every open tap (instances whose tap closed are dropped from :attr:`taps`)."""
        if not self._opened:
            await self.open()
        items = list(self.taps.items())

        async def one(instance: str, tap_id: str, after: int) -> Any:
            return await ask(self.client, instance, "tap.poll", tap_id, after)

        results = await asyncio.gather(*(one(i, t, a) for i, (t, a) in items), return_exceptions=True)
        events: list[dict[str, Any]] = []
        for (instance, (tap_id, _)), result in zip(items, results, strict=True):
            if isinstance(result, CallError):
                self.missing[instance] = f"{result.code}: {result.message}"
                del self.taps[instance]
                continue
            if isinstance(result, BaseException):
                raise result
            for event in result["events"]:
                event["instance"] = instance
                events.append(event)
            self.dropped[instance] = result.get("dropped", 0)
            if result["closed"]:
                del self.taps[instance]
            else:
                self.taps[instance] = (tap_id, result["next"])
        events.sort(key=lambda e: e["start_unix_us"])
        return events

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if not self._opened:
            await self.open()
        while self.taps:
            for event in await self.poll():
                yield event
            if self.taps:
                await asyncio.sleep(self.poll_interval)  # the poll period: taps are pulled, not pushed

    async def close(self) -> None:
        """Close every tap still open (best effort: an instance that is gone closes its own)."""
        items, self.taps = list(self.taps.items()), {}
        await asyncio.gather(*(ask(self.client, i, "tap.close", t) for i, (t, _) in items),
                             return_exceptions=True)
