"""The span buffer, stats and log rules of meshkit.observe: pure cores, no I/O."""

from __future__ import annotations

import logging

import pytest

from meshkit.observe.logfilter import LogLevelError, LogRules
from meshkit.observe.spans import BUCKET_BOUNDS_US, Span, SpanBuffer, bucket_of, clean_attrs
from meshkit.observe.stats import Stats, quantile


def span(n: int, duration_us: int = 5, status: str = "ok", trace: str = "t", attrs: dict | None = None) -> Span:
    return Span(trace, f"{n:016x}", None, "svc", "i1", "h", "m", "server", n, duration_us, status, attrs)


def test_bucket_of_follows_the_zpages_bounds() -> None:
    assert [bucket_of(us) for us in (0, 9, 10, 99, 100, 999_999, 1_000_000, 10_000_000, 10**9)] == \
        [0, 0, 1, 1, 2, 5, 6, 7, 7]
    assert len(BUCKET_BOUNDS_US) == 8


def test_count_bound_keeps_the_newest_and_a_sample_per_bucket() -> None:
    buf = SpanBuffer(count=100, max_bytes=10**9, per_bucket=3, errors=5)
    buf.add(span(0, duration_us=2_000_000))  # one slow call ...
    buf.add(span(1, status="handler_error"))  # ... and one failure ...
    for n in range(2, 10_002):  # ... then a flood of fast ones
        buf.add(span(n))
    assert len(buf) <= 100 + 3 * 8 + 5
    assert [s.span_id for s in buf.find(select="slow", limit=1)] == [f"{0:016x}"]
    assert [s.status for s in buf.find(select="errors")] == ["handler_error"]
    assert buf.find(limit=1)[0].start_unix_us == 10_001
    assert buf.recorded == 10_002


def test_byte_bound_sheds_the_oldest_first() -> None:
    big = {"query": "x" * 400}
    buf = SpanBuffer(count=10_000, max_bytes=50_000, per_bucket=2, errors=2)
    for n in range(1000):
        buf.add(span(n, attrs=big))
    assert buf.bytes <= 50_000
    assert 0 < len(buf) < 100
    assert buf.find(limit=1)[0].start_unix_us == 999
    assert buf.bytes >= sum(s.cost() for s in buf.spans())  # counted per store: conservative


def test_find_by_trace_and_service_and_bad_select() -> None:
    buf = SpanBuffer()
    buf.add(span(1, trace="a"))
    buf.add(span(2, trace="b"))
    assert [s.trace_id for s in buf.find(trace_id="a")] == ["a"]
    assert buf.find(service="other") == []
    with pytest.raises(ValueError):
        buf.find(select="everything")


def test_clean_attrs_clips_and_bounds() -> None:
    attrs = clean_attrs({"q": "y" * 5000, "n": 3, "f": 1.5, "ok": True, "obj": [1, 2]} |
                        {f"k{i}": i for i in range(100)})
    assert len(attrs) == 33 and attrs["attrs_dropped"] == 105 - 32
    assert len(str(attrs["q"])) < 600 and attrs["n"] == 3 and attrs["ok"] == "true" and attrs["obj"] == "[1, 2]"


def test_stats_count_errors_and_buckets_and_bound_names() -> None:
    stats = Stats()
    c = stats.counter(False, "m")
    c.in_flight += 2
    c.finish(bucket_of(50), None)
    c.finish(bucket_of(5_000), "handler_error", "boom")
    d = stats.to_dict()["methods"]["m"]
    assert d["calls"] == 2 and d["errors"] == {"handler_error": 1} and d["in_flight"] == 0
    assert d["buckets"][1] == 1 and d["buckets"][3] == 1 and d["last_error"]["message"] == "boom"
    for i in range(2000):
        stats.counter(True, f"t{i}")
    assert len(stats.pushes) == 1025 and "(other)" in stats.pushes


def test_quantile_reads_the_upper_bound_of_the_bucket() -> None:
    assert quantile([0] * 8, 0.5) is None
    assert quantile([0, 90, 0, 10, 0, 0, 0, 0], 0.5) == 100
    assert quantile([0, 90, 0, 10, 0, 0, 0, 0], 0.99) == 10_000
    assert quantile([0, 0, 0, 0, 0, 0, 0, 1], 0.5) == 100_000_000


def test_log_rules_let_one_customer_through_at_debug() -> None:
    from meshkit.context import CallContext, reset_current, set_current
    from meshkit.trace import TraceContext

    root = logging.getLogger("test-observe-root")
    root.setLevel(logging.INFO)
    handler = logging.NullHandler()
    root.addHandler(handler)
    rules = LogRules(root)
    try:
        rules.set("DEBUG", {"customer": "c42"})
        assert root.level == logging.DEBUG and rules in handler.filters
        record = logging.LogRecord("x", logging.DEBUG, "", 0, "m", None, None)
        assert not rules.filter(record)
        token = set_current(CallContext("s", "m", TraceContext.new_root(), meta={"customer": "c42"}))
        try:
            assert rules.filter(record)
        finally:
            reset_current(token)
        assert rules.level_for({"customer": "other"}) == logging.INFO
        assert rules.describe()["rules"] == [{"where": {"customer": "c42"}, "level": "DEBUG"}]
        rules.set("reset", {"customer": "c42"})
        assert root.level == logging.INFO and rules not in handler.filters
        with pytest.raises(LogLevelError):
            rules.set("LOUD")
    finally:
        root.removeHandler(handler)
