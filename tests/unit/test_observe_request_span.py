"""The gateway's request span (``RequestSpan``) records what ``UserSpan`` records, and the observer's row path.

Each case runs the same work once under a :class:`UserSpan` (``kind="server"``,
as the gateway opened it before) and once under a :class:`RequestSpan`, each
on an observer of its own, and compares the kept spans field by field: every
field but the fresh ids and the times must be equal, and the ids must relate
to their parents the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meshkit.context import CallContext, current_call, reset_current, set_current
from meshkit.errors import CallTimeoutError
from meshkit.observe.observer import Observer
from meshkit.observe.options import ObserveOptions
from meshkit.observe.spans import MAX_ATTR_TEXT, Span
from meshkit.observe.user import RequestSpan, UserSpan
from meshkit.trace import TraceContext

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ATTRS = {"conn": "gw1-2a"}

Make = Callable[[Observer, str | None], Any]


def _user(observer: Observer, traceparent: str | None) -> UserSpan:
    return UserSpan(observer, "echo.echo", dict(ATTRS), traceparent=traceparent, kind="server")


def _request(observer: Observer, traceparent: str | None) -> RequestSpan:
    return RequestSpan(observer, "echo.echo", dict(ATTRS), traceparent=traceparent)


def _observer(**options: Any) -> Observer:
    return Observer("gateway", "gw1", "box", ObserveOptions(**options))


def _run(make: Make, traceparent: str | None, body: Callable[[Any], None] | None = None,
         outer: CallContext | None = None, **options: Any) -> tuple[list[Span], Any]:
    """Run ``body(span)`` inside the span ``make`` opens; the spans kept and what was current inside."""
    observer = _observer(**options)
    token = set_current(outer) if outer is not None else None
    seen: dict[str, Any] = {}
    try:
        span = make(observer, traceparent)
        try:
            with span:
                seen["inside"] = current_call()
                if body is not None:
                    body(span)
        except Exception:
            pass
        seen["after"] = current_call()
        seen["trace_id"] = span.trace_id
    finally:
        if token is not None:
            reset_current(token)
    return list(observer.spans.spans()), seen


def _same(a: Span, b: Span) -> None:
    da, db = a.to_dict(), b.to_dict()
    for key in ("span_id", "start_unix_us", "duration_us"):
        da.pop(key), db.pop(key)
    if da["parent_id"] not in (None, PARENT_ID):  # a fresh parent (the outer call's) is compared apart
        da.pop("parent_id"), db.pop("parent_id")
    if da["trace_id"] not in (TRACE_ID,):
        da.pop("trace_id"), db.pop("trace_id")
    assert da == db


def _raise_timeout(span: Any) -> None:
    raise CallTimeoutError("echo.echo got no reply within its deadline", service="echo", method="echo")


def _raise_plain(span: Any) -> None:
    raise ValueError("x" * (MAX_ATTR_TEXT + 50))


def _status_then_raise(span: Any) -> None:
    span.set_status("overloaded")
    raise RuntimeError("refused")


@pytest.mark.parametrize("traceparent", [None, TRACEPARENT])
@pytest.mark.parametrize("body", [None, _raise_timeout, _raise_plain, _status_then_raise])
def test_the_request_span_records_what_the_user_span_did(traceparent: str | None,
                                                         body: Callable[[Any], None] | None) -> None:
    (old,), old_seen = _run(_user, traceparent, body)
    (new,), new_seen = _run(_request, traceparent, body)
    _same(old, new)
    assert new.kind == "server" and new.name == "echo.echo" and new.service == "gateway"
    assert new.instance == "gw1" and new.host == "box"
    if traceparent is None:
        assert new.parent_id is None and new.trace_id != TRACE_ID
    else:
        assert (new.trace_id, new.parent_id) == (TRACE_ID, PARENT_ID)
    inside = new_seen["inside"]
    assert isinstance(inside, CallContext) and inside.trace.span_id == new.span_id
    assert (inside.service, inside.name) == ("gateway", "echo.echo")
    assert new_seen["after"] is None and old_seen["after"] is None
    assert new_seen["trace_id"] == new.trace_id


def test_an_unsampled_trace_keeps_no_span_but_travels() -> None:
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    assert _run(_user, unsampled)[0] == []
    spans, seen = _run(_request, unsampled)
    assert spans == []
    assert seen["inside"].trace.traceparent().endswith("-00")


def test_statuses_and_errors() -> None:
    (ok,), _ = _run(_request, None)
    assert (ok.status, ok.attrs) == ("ok", ATTRS)
    (timeout,), _ = _run(_request, None, _raise_timeout)
    assert timeout.status == "timeout"
    assert timeout.attrs == {**ATTRS, "error": "echo.echo got no reply within its deadline"}
    (plain,), _ = _run(_request, None, _raise_plain)
    assert plain.status == "ValueError"
    assert plain.attrs is not None and isinstance(plain.attrs["error"], str)
    assert plain.attrs["error"].startswith("x" * MAX_ATTR_TEXT) and len(plain.attrs["error"]) < MAX_ATTR_TEXT + 20
    (told,), _ = _run(_request, None, _status_then_raise)
    assert told.status == "overloaded"


def test_inside_a_call_it_is_a_child_of_that_call() -> None:
    outer_trace = TraceContext.new_root()
    outer = CallContext("gateway", "http", outer_trace, meta={"client": "10.0.0.1:5"})
    (old,), old_seen = _run(_user, None, outer=outer)
    (new,), new_seen = _run(_request, None, outer=outer)
    _same(old, new)
    assert (new.trace_id, new.parent_id) == (outer_trace.trace_id, outer_trace.span_id)
    inside = new_seen["inside"]
    assert inside.meta == outer.meta and inside.trace.span_id == new.span_id
    assert new_seen["after"] is outer and old_seen["after"] is outer


def test_a_traceparent_wins_over_the_call_being_served() -> None:
    outer = CallContext("gateway", "http", TraceContext.new_root())
    (new,), _ = _run(_request, TRACEPARENT, outer=outer)
    (old,), _ = _run(_user, TRACEPARENT, outer=outer)
    assert (new.trace_id, new.parent_id) == (old.trace_id, old.parent_id) == (TRACE_ID, PARENT_ID)


def test_a_malformed_traceparent_starts_a_new_trace_rooted_at_this_span() -> None:
    bad = f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"  # 55 characters, as the gateway passes on, but not W3C
    (new,), _ = _run(_request, bad)
    assert new.trace_id != TRACE_ID.lower() and new.parent_id is None


def test_nothing_is_kept_with_spans_off_but_the_trace_still_travels() -> None:
    spans, seen = _run(_request, TRACEPARENT, spans=False)
    assert spans == []
    assert seen["inside"].trace.trace_id == TRACE_ID  # mesh calls made inside still carry it


def test_an_exporter_sees_the_span_kept() -> None:
    observer = _observer()
    exported: list[Span] = []
    observer.exporter = exported.append
    with RequestSpan(observer, "echo.echo", dict(ATTRS)):
        pass
    (kept,) = observer.spans.spans()
    assert [s.to_dict() for s in exported] == [kept.to_dict()]


def test_observer_span_keeps_what_it_kept_before() -> None:
    """Observer.span (the client span of every call) keeps its row directly; the fields are the Span's."""
    observer = _observer()
    trace = TraceContext.from_traceparent(TRACEPARENT)
    observer.span(trace, "echo.echo", "client", 1_700_000_000.25, 0.0015, "ok")
    observer.span(trace, "echo.echo", "client", 1_700_000_000.5, 0.002, "timeout", {"error": "late"})
    kept = sorted((s.to_dict() for s in observer.spans.spans()), key=lambda d: d["start_unix_us"])
    assert kept == [
        {"trace_id": TRACE_ID, "span_id": trace.span_id, "parent_id": PARENT_ID, "service": "gateway",
         "instance": "gw1", "host": "box", "name": "echo.echo", "kind": "client",
         "start_unix_us": 1_700_000_000_250_000, "duration_us": 1500, "status": "ok", "attrs": {}},
        {"trace_id": TRACE_ID, "span_id": trace.span_id, "parent_id": PARENT_ID, "service": "gateway",
         "instance": "gw1", "host": "box", "name": "echo.echo", "kind": "client",
         "start_unix_us": 1_700_000_000_500_000, "duration_us": 2000, "status": "timeout",
         "attrs": {"error": "late"}},
    ]
    assert [s.status for s in observer.spans.find(select="errors")] == ["timeout"]
    unsampled = TraceContext(TRACE_ID, PARENT_ID, sampled=False)
    observer.span(unsampled, "echo.echo", "client", 1.0, 0.001)
    assert len(observer.spans) == 2
