"""Trace context (W3C traceparent) and the call context handlers see."""

from __future__ import annotations

import asyncio
import contextvars
import re

import pytest

from meshkit.context import CallContext, current_call, reset_current, set_current
from meshkit.trace import TraceContext

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")


def test_new_root() -> None:
    root = TraceContext.new_root()
    assert re.fullmatch(r"[0-9a-f]{32}", root.trace_id)
    assert re.fullmatch(r"[0-9a-f]{16}", root.span_id)
    assert root.parent_id is None
    assert root.sampled is True
    other = TraceContext.new_root()
    assert other.trace_id != root.trace_id and other.span_id != root.span_id


def test_traceparent_format() -> None:
    ctx = TraceContext(TRACE_ID, PARENT_ID)
    assert ctx.traceparent() == TRACEPARENT
    unsampled = TraceContext(TRACE_ID, PARENT_ID, sampled=False)
    assert unsampled.traceparent() == f"00-{TRACE_ID}-{PARENT_ID}-00"
    assert TRACEPARENT_RE.fullmatch(TraceContext.new_root().traceparent())


def test_child_of_a_valid_traceparent() -> None:
    child = TraceContext.from_traceparent(TRACEPARENT)
    assert child.trace_id == TRACE_ID
    assert child.parent_id == PARENT_ID
    assert child.span_id != PARENT_ID
    assert re.fullmatch(r"[0-9a-f]{16}", child.span_id)
    assert child.sampled is True


@pytest.mark.parametrize(
    ("flags", "sampled"), [("00", False), ("01", True), ("03", True), ("02", False)]
)
def test_sampled_flag(flags: str, sampled: bool) -> None:
    assert TraceContext.from_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-{flags}").sampled is sampled


def test_propagation_across_hops() -> None:
    root = TraceContext.new_root()
    hop1 = TraceContext.from_traceparent(root.traceparent())
    hop2 = TraceContext.from_traceparent(hop1.traceparent())
    assert root.trace_id == hop1.trace_id == hop2.trace_id
    assert hop1.parent_id == root.span_id
    assert hop2.parent_id == hop1.span_id


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        TRACEPARENT + "-extra",
        TRACEPARENT[:-1],
        TRACEPARENT.upper(),
        TRACEPARENT.replace("-", "_"),
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{'g' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'x' * 16}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-zz",
    ],
    ids=repr,
)
def test_malformed_traceparent_starts_a_new_trace(value: str | None) -> None:
    ctx = TraceContext.from_traceparent(value)
    assert ctx.parent_id is None
    assert ctx.trace_id != TRACE_ID
    assert TRACEPARENT_RE.fullmatch(ctx.traceparent())


@pytest.mark.parametrize(
    "trace_id",
    [
        "4bf92f35_7b34da6a3ce929d0e0e4736",
        " bf92f3577b34da6a3ce929d0e0e4736",
        "-bf92f3577b34da6a3ce929d0e0e4736",
    ],
    ids=["underscore", "space", "sign"],
)
def test_non_hex_digits_are_rejected(trace_id: str) -> None:
    ctx = TraceContext.from_traceparent(f"00-{trace_id}-{PARENT_ID}-01")
    assert ctx.parent_id is None
    assert TRACEPARENT_RE.fullmatch(ctx.traceparent())


# -- the call context -----------------------------------------------------------


def _ctx(**changes: object) -> CallContext:
    fields: dict[str, object] = {"service": "cart", "name": "add", "trace": TraceContext.new_root()}
    fields.update(changes)
    return CallContext(**fields)  # type: ignore[arg-type]


def test_remaining_is_measured_against_the_given_clock() -> None:
    ctx = _ctx(deadline=100.0)
    assert ctx.remaining(now=99.25) == 0.75
    assert ctx.remaining(now=100.0) == 0.0
    assert ctx.remaining(now=250.0) == 0.0  # never negative
    assert _ctx().remaining(now=0.0) is None


def test_connection_id_comes_from_meta() -> None:
    assert _ctx(meta={"conn": "c-17", "x": "y"}).connection_id == "c-17"
    assert _ctx().connection_id is None
    assert _ctx().meta == {}


def test_current_call_set_and_reset() -> None:
    assert current_call() is None
    ctx = _ctx()
    token = set_current(ctx)
    try:
        assert current_call() is ctx
        inner = _ctx(name="nested")
        inner_token = set_current(inner)
        assert current_call() is inner
        reset_current(inner_token)
        assert current_call() is ctx
    finally:
        reset_current(token)
    assert current_call() is None


def test_current_call_is_per_context() -> None:
    ctx = _ctx()

    def serve() -> CallContext | None:
        set_current(ctx)
        return current_call()

    assert contextvars.copy_context().run(serve) is ctx
    assert current_call() is None  # the copy did not leak out


def test_current_call_is_per_task() -> None:
    async def handler(name: str) -> str | None:
        set_current(_ctx(name=name))
        await asyncio.sleep(0)  # let the other task run in between
        seen = current_call()
        return seen.name if seen else None

    async def main() -> list[str | None]:
        return list(await asyncio.gather(handler("a"), handler("b")))

    assert asyncio.run(main()) == ["a", "b"]
    assert current_call() is None


def test_made_ids_are_never_all_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    monkeypatch.setattr(random, "getrandbits", lambda bits: 0)
    root = TraceContext.new_root()
    assert (root.trace_id, root.span_id) == ("0" * 31 + "1", "0" * 15 + "1")
    assert root.child().span_id == "0" * 15 + "1"
    assert TraceContext.from_traceparent(TRACEPARENT).span_id == "0" * 15 + "1"
