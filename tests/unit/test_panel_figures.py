"""The panel's figures: rates and quantiles from stats readings, the call graph from spans, the topology."""

from __future__ import annotations

from typing import Any

from panelfakes import record, span

from meshkit.panel.figures import StatsReading, call_edges, method_rows, quantile_us, topology

BOUNDS = [0, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000]


def stats(calls: int, errors: dict[str, int] | None = None, buckets: list[int] | None = None,
          in_flight: int = 0, last_error: Any = None) -> dict[str, Any]:
    return {"bucket_bounds_us": BOUNDS, "methods": {"m": {
        "calls": calls, "errors": errors or {}, "buckets": buckets or [0] * 8, "in_flight": in_flight,
        "last_error": last_error}}}


def test_quantiles_are_the_upper_bound_of_their_bucket() -> None:
    buckets = [0, 0, 0, 98, 1, 0, 0, 1]  # 98 calls in [1 ms, 10 ms), one in [10, 100) ms, one ≥ 10 s
    assert quantile_us(buckets, BOUNDS, 0.5) == 10_000
    assert quantile_us(buckets, BOUNDS, 0.99) == 100_000
    assert quantile_us(buckets, BOUNDS, 1.0) == 100_000_000  # the open bucket: 10 times its lower bound
    assert quantile_us([0] * 8, BOUNDS, 0.5) is None


def test_rates_and_latency_are_those_of_the_interval_summed_over_instances() -> None:
    before = {"a1": StatsReading("a", "a1", 10.0, stats(100, {"timeout": 1}, [0, 0, 0, 100, 0, 0, 0, 0])),
              "a2": StatsReading("a", "a2", 10.0, stats(50, {}, [0, 0, 0, 50, 0, 0, 0, 0]))}
    now = [StatsReading("a", "a1", 12.0, stats(120, {"timeout": 3}, [0, 0, 0, 100, 20, 0, 0, 0], in_flight=2)),
           StatsReading("a", "a2", 12.0, stats(70, {}, [0, 0, 0, 50, 20, 0, 0, 0], in_flight=1))]
    [row] = method_rows(now, before)
    assert (row["service"], row["method"], row["instances"]) == ("a", "m", 2)
    assert row["rate"] == 20.0  # (20 + 20) calls in 2 s
    assert row["error_rate"] == 1.0
    assert (row["calls"], row["errors"], row["in_flight"]) == (190, 3, 3)
    # In the interval every call took 10-100 ms, whatever the history says.
    assert row["p50_us"] == 100_000 and row["p99_us"] == 100_000


def test_a_first_reading_or_a_restarted_instance_gives_totals_but_no_rate() -> None:
    [row] = method_rows([StatsReading("a", "a1", 5.0, stats(10, buckets=[0, 0, 10, 0, 0, 0, 0, 0]))], {})
    assert row["rate"] is None and row["calls"] == 10
    assert row["p50_us"] == 1000  # no interval yet: the histogram of all time
    before = {"a1": StatsReading("a", "a1", 1.0, stats(500))}
    [row] = method_rows([StatsReading("a", "a1", 5.0, stats(3))], before)  # counters went down: a restart
    assert row["rate"] is None


def test_topics_received_are_rows_of_kind_push() -> None:
    reading = stats(4)
    reading["pushes"] = {"pool.job": {"calls": 2, "errors": {}, "buckets": [0, 2, 0, 0, 0, 0, 0, 0], "in_flight": 0}}
    rows = method_rows([StatsReading("mining", "m1", 1.0, reading)], {})
    assert [(r["kind"], r["method"], r["calls"]) for r in rows] == [("call", "m", 4), ("push", "pool.job", 2)]


def test_the_latest_error_of_any_instance_is_shown() -> None:
    old = {"code": "timeout", "message": "slow", "unix": 100.0}
    new = {"code": "bad_arguments", "message": "no", "unix": 200.0}
    rows = method_rows([StatsReading("a", "a1", 1.0, stats(1, last_error=new)),
                        StatsReading("a", "a2", 1.0, stats(1, last_error=old))], {})
    assert rows[0]["last_error"]["code"] == "bad_arguments"


def test_malformed_stats_answers_are_skipped_not_trusted() -> None:
    garbage: list[dict[str, Any]] = [
        {}, {"methods": "x"}, {"methods": {"m": "x"}},
        {"methods": {"m": {"calls": "many", "errors": [1], "buckets": "x", "in_flight": -4}}},
        {"bucket_bounds_us": "x", "methods": {"m": {"calls": True, "buckets": [1, "x", None]}}},
    ]
    rows = method_rows([StatsReading("a", f"a{i}", 1.0, g) for i, g in enumerate(garbage)], {})
    assert [(r["calls"], r["errors"], r["in_flight"]) for r in rows] == [(0, 0, 0)]


def test_edges_are_drawn_from_spans_whose_parent_is_in_another_service() -> None:
    spans = [
        span("t1", "g1", None, "gateway", kind="client"),
        span("t1", "a1", "g1", "hop-a"), span("t1", "ac", "a1", "hop-a", kind="client"),
        span("t1", "b1", "ac", "hop-b"), span("t1", "u1", "b1", "hop-b", kind="internal"),
        span("t2", "a2", "gone", "hop-a"),  # parent forgotten: no edge
        span("t3", "a3", "x", "hop-a"), span("t3", "x", None, "gateway", kind="client"),
    ]
    edges = call_edges([*spans, spans[1]])  # a span read twice counts once
    assert edges == [{"from": "gateway", "to": "hop-a", "kind": "call", "calls": 2, "errors": 0},
                     {"from": "hop-a", "to": "hop-b", "kind": "call", "calls": 1, "errors": 0}]
    assert call_edges([{"span_id": 1}, "junk", {"parent_id": ["x"]},  # type: ignore[list-item]
                       {"span_id": "p", "service": "a"}, {"parent_id": "p", "service": "b", "kind": ["x"]}]) == []


def test_a_push_is_an_edge_of_its_own_kind() -> None:
    spans = [span("t", "p", None, "jobs", kind="producer"), span("t", "c", "p", "mining", kind="consumer"),
             span("u", "m", None, "mining", kind="client"), span("u", "j", "m", "jobs", status="timeout")]
    assert call_edges(spans) == [{"from": "jobs", "to": "mining", "kind": "push", "calls": 1, "errors": 0},
                                 {"from": "mining", "to": "jobs", "kind": "call", "calls": 1, "errors": 1}]


def test_topology_groups_instances_by_service_and_host_with_state() -> None:
    records = [record("a", "a2", host="h2"), record("a", "a1", host="h1"), record("b", "b1", state="draining")]
    topo = topology(records, {"a2"}, [{"from": "client-gone", "to": "a", "calls": 1}])
    names = [s["name"] for s in topo["services"]]
    assert names == ["a", "b", "client-gone"]
    a = topo["services"][0]
    grouped = [(h["host"], [i["instance"] for i in h["instances"]]) for h in a["hosts"]]
    assert grouped == [("h1", ["a1"]), ("h2", ["a2"])]
    assert a["hosts"][1]["instances"][0]["state"] == "unreachable"
    assert topo["services"][1]["hosts"][0]["instances"][0]["state"] == "draining"
    assert topo["services"][2]["hosts"] == []
