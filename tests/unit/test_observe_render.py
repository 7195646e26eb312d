"""What meshkit trace/stats/tap print, and the trace tree, from answers (pure, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from meshkit.cli import main
from meshkit.observe import render
from meshkit.observe.query import build_tree


def span(span_id: str, parent: str | None, name: str, start: int, duration: int, kind: str = "server",
         service: str = "svc", status: str = "ok", attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"trace_id": "t" * 32, "span_id": span_id, "parent_id": parent, "service": service,
            "instance": "abcdef123456", "host": "h1", "name": name, "kind": kind, "start_unix_us": start,
            "duration_us": duration, "status": status, "attrs": attrs or {}}


def test_build_tree_nests_by_parent_orders_by_start_and_merges_duplicates() -> None:
    spans = [span("c", "a", "second", 300, 10), span("a", "root-not-kept", "top", 100, 1000),
             span("b", "a", "first", 200, 10), span("b", "a", "first", 200, 10), span("x", None, "other", 50, 5)]
    tree = build_tree(spans)
    assert [n["name"] for n in tree] == ["other", "top"]
    assert [c["name"] for c in tree[1]["children"]] == ["first", "second"]


def test_waterfall_shows_offsets_depth_status_and_user_span_attributes() -> None:
    tree = build_tree([
        span("a", None, "order", 1_000_000, 10_000, service="a"),
        span("b", "a", "b.lookup", 1_001_000, 8_000, kind="client", service="a"),
        span("c", "b", "lookup", 1_002_000, 6_000, service="b", status="handler_error", attrs={"error": "boom"}),
        span("d", "c", "sql", 1_003_000, 2_000, kind="internal", service="b", attrs={"query": "select 1"}),
    ])
    text = render.waterfall("t" * 32, tree, {"dead1234": "timeout: no answer"})
    lines = text.splitlines()
    assert lines[0] == f"trace {'t' * 32}: 4 spans, 2 services, 10.0ms"
    assert lines[2].split()[:4] == ["0.0ms", "10.0ms", "ok", "order"]
    assert "      sql query='select 1'" in lines[5] and lines[5].split()[:3] == ["3.0ms", "2.0ms", "ok"]
    assert "handler_error" in lines[4] and "error='boom'" in lines[4]
    assert lines[2].endswith("|" + "█" * 30 + "|")
    assert "abcdef@h1" in lines[3]
    assert lines[-1] == "(instance dead1234 did not answer: timeout: no answer)"
    assert "no spans found" in render.waterfall("t" * 32, [])


def test_stats_table_and_event_line() -> None:
    answer = {"methods": [{"service": "b", "method": "lookup", "kind": "call", "instances": 2, "calls": 10,
                           "rate": 4.5, "errors": 1, "error_rate": 0.1, "p50_us": 1000.0, "p99_us": 100000.0,
                           "in_flight": 0}], "missing": {}}
    table = render.stats_table(answer).splitlines()
    assert table[0].split() == ["SERVICE", "METHOD", "KIND", "INST", "CALLS", "RATE/S", "ERRORS", "ERR%", "P50",
                                "P99", "INFLIGHT"]
    assert table[1].split() == ["b", "lookup", "call", "2", "10", "4.5", "1", "10.0", "1.0ms", "100.0ms", "0"]
    event = {**span("a", None, "lookup", 0, 1500), "meta": {"customer": "c1"}, "args": "['c1']",
             "instance": "abcdef123456"}
    line = render.event_line(event)
    assert "svc.lookup server ok 1.5ms" in line and "customer=c1" in line and "args=['c1']" in line


@pytest.mark.parametrize("argv", [["trace"], ["trace", "not-a-trace-id"], ["trace", "a" * 32, "--slow", "x"],
                                  ["tap", "--where", "novalue"]])
def test_bad_command_lines_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_gateway_reads_a_traceparent_and_a_trace_request() -> None:
    from meshkit.gateway.jsonrpc import Request, parse_request

    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    got = parse_request({"method": "a.b", "id": 1, "traceparent": tp})
    assert isinstance(got, Request) and got.traceparent == tp and got.want_trace
    asked = parse_request({"method": "a.b", "id": 1, "trace": True})
    assert isinstance(asked, Request) and asked.traceparent is None and asked.want_trace
    for ignored in ({"traceparent": 42}, {"traceparent": "x" * 55 + "y"}, {"trace": "yes"}):
        plain = parse_request({"method": "a.b", "id": 1, **ignored})
        assert isinstance(plain, Request) and not plain.want_trace and plain == Request(1, "a.b", None)
