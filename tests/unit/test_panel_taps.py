"""A tab's live flow: filters checked, taps opened on matching instances with a share of the budget, closed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from panelfakes import FakeReader, record

from meshkit.panel.taps import TapFilter, TapSession


def test_a_filter_keeps_what_it_was_given() -> None:
    raw = {"service": "hop-a", "method": "begin", "where": {"conn": "gw-1.7"}, "errors_only": True,
           "min_latency_ms": 5}
    assert TapFilter.from_json(raw).to_json() == {**raw, "min_latency_ms": 5.0}
    assert TapFilter.from_json(None).to_json() == {}
    assert TapFilter.from_json({"service": "", "where": {}}).to_json() == {}


@pytest.mark.parametrize("raw, words", [
    ("x", "a filter is an object"),
    ({"servce": "a"}, "unknown filter fields"),
    ({"service": "Bad Name"}, "service"),
    ({"service": 3}, "service must be a name"),
    ({"method": "a b"}, "method"),
    ({"where": {"k": 1}}, "where k must be a string"),
    ({"where": {"bad key": "v"}}, "where key"),
    ({"where": {f"k{i}": "v" for i in range(9)}}, "at most 8"),
    ({"where": {"k": "v" * 201}}, "at most 200"),
    ({"errors_only": "yes"}, "errors_only"),
    ({"min_latency_ms": -1}, "min_latency_ms"),
    ({"min_latency_ms": float("nan")}, "min_latency_ms"),
])
def test_a_bad_filter_is_refused_with_a_clear_clipped_error(raw: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        TapFilter.from_json(raw)
    assert len(str(caught.value)) < 400


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_taps_open_on_matching_instances_with_a_share_of_the_budget() -> None:
    reader = FakeReader(record("a", "a1"), record("a", "a2"), record("b", "b1"), record("a", "a3", state="draining"))
    emitted: list[dict[str, Any]] = []
    session = TapSession(reader, TapFilter(service="a", where={"conn": "c7"}), emitted.append, max_rps=10)
    run(session.sync())
    assert sorted(i for i, _, _ in reader.opened) == ["a1", "a2"]  # not b1, not the draining a3
    assert {rps for _, _, rps in reader.opened} == {5.0}
    assert all(f == {"service": "a", "where": {"conn": "c7"}} for _, f, _ in reader.opened)
    run(session.sync())
    assert len(reader.opened) == 2  # no second tap on the same instance


def test_each_instance_gets_at_least_one_event_per_second() -> None:
    session = TapSession(FakeReader(), TapFilter(), lambda e: None, max_rps=4)
    assert session.per_instance_rps(100) == 1.0
    assert session.per_instance_rps(0) == 4.0


def test_events_are_emitted_and_polled_from_where_the_last_poll_ended() -> None:
    reader = FakeReader(record("a", "a1"))
    emitted: list[dict[str, Any]] = []
    session = TapSession(reader, TapFilter(), emitted.append)

    async def main() -> None:
        await session.sync()
        reader.offer("a1", {"trace_id": "t1", "name": "a.m"})
        reader.offer("a1", {"trace_id": "t2", "name": "a.m"})
        await session.poll_once()
        await session.poll_once()

    run(main())
    assert [e["event"]["trace_id"] for e in emitted] == ["t1", "t2"]
    assert all(e == {"type": "event", "instance": "a1", "event": e["event"]} for e in emitted)
    assert [after for _, after in reader.polls] == [0, 2]


def test_a_tap_that_closed_by_itself_is_reported_and_not_reopened() -> None:
    reader = FakeReader(record("a", "a1"))
    emitted: list[dict[str, Any]] = []
    session = TapSession(reader, TapFilter(), emitted.append)

    async def main() -> None:
        await session.sync()
        reader.tap_closed.add("tap-a1-0")
        await session.poll_once()
        await session.sync()

    run(main())
    assert emitted == [{"type": "tap", "state": "instance-closed", "instance": "a1"}]
    assert len(reader.opened) == 1 and session.open == {}


def test_a_new_instance_is_tapped_and_a_gone_one_forgotten() -> None:
    reader = FakeReader(record("a", "a1"))
    session = TapSession(reader, TapFilter(), lambda e: None)
    run(session.sync())
    reader.records = [record("a", "a2")]
    run(session.sync())
    assert set(session.open) == {"a2"}


def test_closing_the_session_closes_every_tap_and_cancellation_does_too() -> None:
    reader = FakeReader(record("a", "a1"), record("b", "b1"))

    async def main() -> None:
        session = TapSession(reader, TapFilter(), lambda e: None, poll_interval=0.001)
        task = asyncio.create_task(session.run())
        while len(reader.opened) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert sorted(reader.closed) == ["tap-a1-0", "tap-b1-1"]


def test_garbage_poll_answers_do_not_stop_the_session() -> None:
    class Garbage(FakeReader):
        async def tap_poll(self, record: Any, tap_id: str, after: int) -> Any:
            return {"events": ["x", 3, {"ok": 1}], "next": "soon", "closed": "yes"}

    reader = Garbage(record("a", "a1"))
    emitted: list[dict[str, Any]] = []
    session = TapSession(reader, TapFilter(), emitted.append)
    run(session.sync())
    run(session.poll_once())
    assert [e["event"] for e in emitted] == [{"ok": 1}]
    assert "a1" in session.open and session.open["a1"].after == 0


def test_events_an_instance_dropped_over_the_rate_limit_are_reported_once_per_increase() -> None:
    reader = FakeReader(record("a", "a1"))
    emitted: list[dict[str, Any]] = []
    session = TapSession(reader, TapFilter(), emitted.append)

    async def main() -> None:
        await session.sync()
        await session.poll_once()
        reader.dropped["tap-a1-0"] = 7
        await session.poll_once()
        await session.poll_once()
        reader.dropped["tap-a1-0"] = 9
        await session.poll_once()

    run(main())
    assert emitted == [{"type": "tap", "state": "limited", "instance": "a1", "dropped": 7},
                       {"type": "tap", "state": "limited", "instance": "a1", "dropped": 9}]
