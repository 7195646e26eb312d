"""The reserved _mesh.* methods on a real in-process instance (ServiceHarness: real router, ipc)."""

from __future__ import annotations

import asyncio
from typing import Any

from inprocess import WAIT, Shop, run, signalled, turns

import meshkit
from meshkit.errors import CallError
from meshkit.observe import query
from meshkit.testing import FakeClock, ServiceHarness
from meshkit.trace import TraceContext


class Traced(Shop):
    name = "traced"

    @meshkit.rpc
    async def lookup(self, key: str) -> str:
        with self.span("sql", query=f"select * from t where k = '{key}'") as s:
            s.set("rows", 1)
        return await self.call("traced", "echo", [key])


async def reserved(h: ServiceHarness[Any], method: str, *args: Any, **kwargs: Any) -> Any:
    return await h.client.call_instance(h.service.instance_id, f"_mesh.{method}", *args, timeout=WAIT, **kwargs)


def test_info_stats_and_spans_of_served_calls() -> None:
    async def body(h: ServiceHarness[Shop]) -> None:
        assert await h.call("echo", 1) == 1
        try:
            await h.call("fail", "boom")
        except CallError:
            pass
        info = await reserved(h, "info")
        assert info["service"] == "shop" and info["instance"] == h.service.instance_id and info["state"] == "up"
        echo = next(m for m in info["methods"] if m["name"] == "echo")
        assert {k: echo[k] for k in ("idempotent", "async", "signature")} == {
            "idempotent": False, "async": True, "signature": "echo(value)"}  # Any checks nothing
        assert [p["name"] for p in echo["params"]] == ["value"]
        assert info["subscriptions"] == ["jobs.*"] and info["periodic"][0]["name"] == "tick"
        stats = await reserved(h, "stats")
        assert stats["methods"]["echo"]["calls"] == 1
        assert stats["methods"]["fail"]["errors"] == {"handler_error": 1}
        assert stats["methods"]["fail"]["last_error"]["message"] == "boom"
        assert "_mesh.info" not in stats["methods"]  # reserved calls are not counted
        errors = await reserved(h, "spans", select="errors")
        assert [s["name"] for s in errors] == ["fail"] and errors[0]["status"] == "handler_error"
        for bad in ({"limit": 0}, {"select": "all"}, {"nope": 1}):
            try:
                await reserved(h, "spans", **bad)
            except CallError as exc:
                assert exc.code == "bad_arguments"
            else:
                raise AssertionError(f"{bad} was accepted")
    run(body)


def test_answered_while_every_slot_is_busy_and_while_draining() -> None:
    async def body(h: ServiceHarness[Shop]) -> None:
        held = asyncio.ensure_future(h.call("hold"))
        await signalled(h.service.holding)
        try:  # the instance's budget is full: a normal call is refused ...
            await h.call("echo", 1, timeout=WAIT)
        except CallError as exc:
            assert "[overloaded]" in str(exc)
        else:
            raise AssertionError("a call past max_inflight was served")
        inflight = await reserved(h, "inflight")  # ... introspection is not
        assert [c["method"] for c in inflight] == ["hold"] and len(inflight[0]["trace_id"]) == 32
        stopping = asyncio.ensure_future(h.service.stop(grace=30))
        for _ in range(100):
            await turns()
            if h.service._server is not None and h.service._server.state == "draining":
                break
        info = await reserved(h, "info")
        assert info["state"] == "draining" and info["in_flight"] == 1
        h.service.release.set()
        assert await asyncio.wait_for(held, WAIT) == "released"
        h.clock.advance(31)
        await asyncio.wait_for(stopping, WAIT)
    run(body, max_inflight=1)


def test_a_trace_across_calls_with_a_user_span_is_one_tree() -> None:
    async def main() -> None:
        async with ServiceHarness(Traced, clock=FakeClock()) as h:
            root = TraceContext.new_root()
            assert await h.client.call("traced", "lookup", ["k1"], traceparent=root.traceparent(),
                                       timeout=WAIT) == "k1"
            await turns()
            got = await query.trace(h.client, root.trace_id)
            spans = got["spans"]
            assert {(s["kind"], s["name"]) for s in spans} == {
                ("server", "lookup"), ("internal", "sql"), ("client", "traced.echo"), ("server", "echo")}
            assert all(s["trace_id"] == root.trace_id for s in spans)
            [top] = got["tree"]
            assert top["name"] == "lookup" and top["parent_id"] == root.span_id
            kids = {c["name"]: c for c in top["children"]}
            assert kids["sql"]["attrs"] == {"query": "select * from t where k = 'k1'", "rows": 1}
            assert [c["name"] for c in kids["traced.echo"]["children"]] == ["echo"]
            stats = await query.stats(h.client, "traced")
            rows = {r["method"]: r for r in stats["methods"]}
            assert rows["lookup"]["calls"] == 1 and rows["lookup"]["p50_us"] is not None
            slow = await query.slow_or_failed(h.client, "traced", "slow")
            assert slow and slow[0]["trace_id"] == root.trace_id
    asyncio.run(main())


def test_log_level_and_unknown_reserved_method() -> None:
    async def body(h: ServiceHarness[Shop]) -> None:
        got = await reserved(h, "log_level", "DEBUG", {"customer": "c1"})
        assert got["rules"] == [{"where": {"customer": "c1"}, "level": "DEBUG"}]
        got = await reserved(h, "log_level", "reset", {"customer": "c1"})
        assert got["rules"] == []
        for method, args in (("nothing", ()), ("log_level", ("LOUD",))):
            try:
                await reserved(h, method, *args)
            except CallError as exc:
                assert exc.code in ("unknown_method", "bad_arguments")
            else:
                raise AssertionError(method)
    run(body)
