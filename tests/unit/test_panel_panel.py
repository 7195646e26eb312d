"""The panel's refresh: one reading of the mesh, sent to every tab, with rates, edges and recent traces."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from panelfakes import FakeReader, record, span

from meshkit.panel.feed import SendQueue
from meshkit.panel.panel import MAX_SPANS, SPANS_PER_INSTANCE, Feed, Panel


def stats(calls: int) -> dict[str, Any]:
    return {"bucket_bounds_us": [0, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000],
            "methods": {"begin": {"calls": calls, "errors": {}, "buckets": [0, 0, 0, calls, 0, 0, 0, 0],
                                  "in_flight": 0, "last_error": None}}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_refresh_reads_every_instance_and_feeds_every_tab() -> None:
    reader = FakeReader(record("hop-a", "a1"), record("hop-b", "b1"), record("hop-b", "b2"))
    reader.stats_of = {"a1": stats(10), "b1": stats(0), "b2": TimeoutError("no answer")}
    reader.spans_of = {"a1": [span("t1", "a", None, "hop-a", start=5),
                              span("t1", "ac", "a", "hop-a", "client", start=5)],
                       "b1": [span("t1", "b", "ac", "hop-b", start=6, status="error")]}
    clock = Clock()
    panel = Panel(reader, clock=clock)
    tabs = [Feed(SendQueue(1 << 20)), Feed(SendQueue(1 << 20))]
    panel.feeds.update(tabs)

    state = asyncio.run(panel.refresh_once())
    for tab in tabs:
        assert json.loads(tab.queue.take() or "")["at"] == state["at"]
    services = {s["name"]: s for s in state["topology"]["services"]}
    states = {i["instance"]: i["state"] for s in services.values() for h in s["hosts"] for i in h["instances"]}
    assert states == {"a1": "up", "b1": "up", "b2": "unreachable"}
    assert state["topology"]["edges"] == [{"from": "hop-a", "to": "hop-b", "kind": "call", "calls": 1, "errors": 1}]
    assert state["traces"] == [{"trace_id": "t1", "service": "hop-a", "name": "hop-a.m", "start_unix_us": 5,
                                "duration_us": 10, "failed": True}]
    assert state["circus"] is None and state["haproxy"] is None
    assert state["panel"] == {"tabs": 2, "taps": 0, "dropped": 0}

    reader.stats_of["a1"] = stats(30)
    clock.now += 2.0
    rows = {(r["service"], r["method"]): r for r in asyncio.run(panel.refresh_once())["methods"]}
    assert rows[("hop-a", "begin")]["rate"] == 10.0


def test_spans_kept_are_bounded() -> None:
    reader = FakeReader(*(record("a", f"a{n}") for n in range(60)))
    reader.spans_of = {f"a{n}": [span(f"t{n}-{i}", f"s{i}", None, "a") for i in range(SPANS_PER_INSTANCE)]
                       for n in range(60)}
    panel = Panel(reader)
    asyncio.run(panel.refresh_once())
    assert len(panel._spans) == MAX_SPANS
    assert len(panel.state()["traces"]) == 50


def test_a_slow_tab_gets_the_latest_state_and_drops_events_when_full() -> None:
    reader = FakeReader(record("a", "a1"))
    panel = Panel(reader)
    slow = Feed(SendQueue(3000))
    panel.feeds.add(slow)
    for _ in range(20):
        asyncio.run(panel.refresh_once())
    assert len(slow.queue) == 1  # one state waits, the latest
    assert json.loads(slow.queue.take() or "")["at"] == panel.state()["at"]
    for i in range(200):
        panel.broadcast({"type": "event", "n": i, "pad": "x" * 50})
    assert slow.queue.queued_bytes <= 3000
    first = json.loads(slow.queue.take() or "")
    assert first["type"] == "dropped" and first["count"] > 0
