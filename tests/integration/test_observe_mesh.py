"""Seeing inside the running mesh, against real processes: a trace through HAProxy, the gateway and two
services found by ``meshkit trace`` from another process; introspection of a busy and of a draining
instance; the span buffer's memory under a flood; taps filtered and rate-limited at the source;
run-time log levels for one customer's calls."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from haproxykit import Sync, kill_haproxy
from lineclient import LineClient

from meshkit import AsyncClient, HandlerError, NoInstanceError, Settings
from meshkit.observe import query
from meshkit.testing import settings_env, wait_until
from meshkit.testing.processes import tcp_listener
from meshkit.trace import TraceContext

pytestmark = pytest.mark.integration

A = "tests.integration.services.traced:TraceA"
B = "tests.integration.services.traced:TraceB"
GATEWAY = "meshkit.gateway:Gateway"
ROOT = Path(__file__).resolve().parents[2]
WAIT = 15.0


def cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "meshkit", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def walk(nodes: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    def go(items: list[dict[str, Any]], depth: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for node in items:
            yield depth, node
            yield from go(node["children"], depth + 1)
    return go(nodes, 0)


@pytest.fixture
def haproxy(mesh_settings: Settings, tmp_path: Path) -> Iterator[Sync]:
    public = tcp_listener()
    runner = Sync(mesh_settings, tmp_path, public)
    yield runner
    runner.stop()
    kill_haproxy(runner.paths)
    public.close()


def test_a_request_through_haproxy_and_the_gateway_is_one_tree_for_meshkit_trace(
        start_service: Any, mesh_settings: Settings, haproxy: Sync) -> None:
    start_service(B)
    start_service(A)
    [gw] = start_service(GATEWAY, env={"MESHKIT_GATEWAY_LIMIT_EXEMPT": ""})
    haproxy.start()
    wait_until(lambda: any(s.up for s in haproxy.servers().values()), WAIT, "the gateway to be up in HAProxy")
    root = TraceContext.new_root()
    client = LineClient(f"127.0.0.1:{haproxy.port}")
    try:
        client.send({"jsonrpc": "2.0", "id": 1, "method": "trace-a.order", "params": ["c42"],
                     "traceparent": root.traceparent()})
        assert client.answer(1)["result"] == "found:c42"
        client.send({"jsonrpc": "2.0", "id": 2, "method": "trace-a.nothing", "params": [], "trace": True})
        failed = client.answer(2)
        assert TraceContext.is_valid_id(failed["error"]["data"]["trace_id"])  # asked: the error names its trace
        client.send({"jsonrpc": "2.0", "id": 3, "method": "trace-a.nothing", "params": []})
        assert "trace_id" not in client.answer(3)["error"]["data"]  # not asked: the answer is as before
    finally:
        client.close()

    done = cli(mesh_settings, "trace", root.trace_id, "--json")  # another process
    assert done.returncode == 0, done
    got = json.loads(done.stdout)
    lines = [(depth, s["service"], s["kind"], s["name"]) for depth, s in walk(got["tree"])]
    assert lines == [
        (0, "gateway", "server", "trace-a.order"),
        (1, "gateway", "client", "trace-a.order"),
        (2, "trace-a", "server", "order"),
        (3, "trace-a", "client", "trace-b.lookup"),
        (4, "trace-b", "server", "lookup"),
        (5, "trace-b", "internal", "sql"),
    ], lines
    [top] = got["tree"]
    assert top["parent_id"] == root.span_id and top["attrs"]["conn"].startswith(gw.record.instance_id)
    sql = next(s for _, s in walk(got["tree"]) if s["name"] == "sql")
    assert sql["attrs"] == {"query": "select * from orders where customer = 'c42'", "rows": 3}
    assert {s["host"] for s in got["spans"]} and all(s["status"] == "ok" for s in got["spans"])

    text = cli(mesh_settings, "trace", root.trace_id)
    assert text.returncode == 0 and "6 spans, 3 services" in text.stdout, text
    assert "sql query='select * from orders where customer = 'c42''" in text.stdout.replace('"', "'"), text.stdout

    called = cli(mesh_settings, "call", "trace-a", "order", '"c7"', "--trace")
    assert called.returncode == 0 and called.stdout.strip() == '"found:c7"', called
    trace_id = called.stderr.split("trace: ", 1)[1].split()[0]
    again = json.loads(cli(mesh_settings, "trace", trace_id, "--json").stdout)
    assert [s["name"] for s in again["spans"]] == ["order", "trace-b.lookup", "lookup", "sql"]


def test_introspection_is_answered_by_a_busy_and_by_a_draining_instance(
        start_service: Any, mesh_settings: Settings) -> None:
    [b] = start_service(B, env={"MESHKIT_HANDLER_THREADS": "2"})
    instance = b.record.instance_id

    async def main() -> None:
        async with AsyncClient(mesh_settings) as client:
            blocked = [asyncio.ensure_future(client.call("trace-b", "block", timeout=WAIT)) for _ in range(3)]

            async def in_flight() -> list[dict[str, Any]]:
                return list(await query.ask(client, instance, "inflight"))

            deadline = time.monotonic() + WAIT
            while len(await in_flight()) < 3:  # two run, one waits for a thread
                assert time.monotonic() < deadline, "the blocking calls never arrived"
                await asyncio.sleep(0.02)
            stats = await query.ask(client, instance, "stats")
            assert stats["methods"]["block"]["in_flight"] == 3
            info = await query.info(client, instance)
            assert info["state"] == "up" and info["in_flight"] == 3 and info["settings"]["handler_threads"] == 2
            await client.call("trace-b", "release")
            assert await asyncio.gather(*blocked) == ["unblocked"] * 3

            held = asyncio.ensure_future(client.call("trace-b", "hold", timeout=WAIT))
            while not await in_flight():
                assert time.monotonic() < deadline + WAIT, "the held call never arrived"
                await asyncio.sleep(0.02)
            b.process.send_signal(signal.SIGTERM)
            while (await query.info(client, instance))["state"] != "draining":
                assert time.monotonic() < deadline + 2 * WAIT, "the instance never said it was draining"
                await asyncio.sleep(0.02)
            assert [c["method"] for c in await in_flight()] == ["hold"]
            assert (await query.ask(client, instance, "log_level"))["level"] == "INFO"
            with pytest.raises(NoInstanceError, match=r"not available|did not take"):  # a user method: refused
                await client.call_instance(instance, "release", timeout=WAIT)
            assert await client.publish("trace-b.release", {}) == 1  # pushes are still served
            assert await held == "released"

    asyncio.run(main())
    assert b.process.wait(WAIT) == 0


def test_the_span_buffer_stays_bounded_under_a_flood_and_keeps_slow_and_failed_calls(
        start_service: Any, mesh_settings: Settings, mesh_client: Any) -> None:
    limit = 1024 * 1024
    [b] = start_service(B, env={"MESHKIT_TRACE_B_SPAN_BUFFER_BYTES": str(limit)})
    instance = b.record.instance_id
    assert mesh_client.call("trace-b", "slow", [0.3]) == 0.3
    with pytest.raises(HandlerError, match="the one failure"):
        mesh_client.call("trace-b", "fail", ["the one failure"])
    mesh_client.call("trace-b", "flood", [20_000, 2000], timeout=60)  # fill the buffer: its steady state
    before = mesh_client.call("trace-b", "rss_kib")
    mesh_client.call("trace-b", "flood", [60_000, 2000], timeout=120)  # ~60 MB of attributes if it kept them
    for _ in range(500):
        mesh_client.call("trace-b", "lookup", ["c1"])
    after = mesh_client.call("trace-b", "rss_kib")
    info = json.loads(cli(mesh_settings, "inspect", instance, "--json").stdout)["info"]
    assert info["spans"]["bytes"] <= limit and info["spans"]["recorded"] >= 80_000 + 500 * 2
    print(f"RSS before {before} KiB, after {after} KiB, spans kept {info['spans']['kept']} "
          f"({info['spans']['bytes']} bytes)")
    assert after - before < 8 * 1024, (before, after)

    slow = cli(mesh_settings, "trace", "--slow", "trace-b", "--json")
    ranked = json.loads(slow.stdout)
    names = [s["name"] for s in ranked]
    # The 0.3 s call survived 80,000 spans and 500 fast calls; only the two floods may rank above it.
    assert "slow" in names[:3] and set(names[:names.index("slow")]) <= {"flood"}, names
    assert ranked[names.index("slow")]["duration_us"] >= 250_000  # the event loop may wake a little early
    errors = json.loads(cli(mesh_settings, "trace", "--errors", "trace-b", "--json").stdout)
    assert [e["name"] for e in errors] == ["fail"] and errors[0]["attrs"]["error"] == "the one failure"
    stats = cli(mesh_settings, "stats", "trace-b")
    assert stats.returncode == 0 and "lookup" in stats.stdout and "flood" in stats.stdout, stats


def test_a_tap_is_filtered_by_metadata_and_rate_limited_at_the_source(
        start_service: Any, mesh_settings: Settings) -> None:
    start_service(B)
    start_service(A)

    async def main() -> tuple[list[dict[str, Any]], float]:
        async with AsyncClient(mesh_settings) as client:
            tap = query.Tap(client, "trace-b", {"method": "lookup", "where": {"customer": "c1"}}, max_rps=5)
            await tap.open()
            assert len(tap.taps) == 1, tap.missing
            started = time.monotonic()
            for n in range(40):
                customer = "c1" if n % 2 else "c2"
                await client.call("trace-a", "order", [customer], meta={"customer": customer, "token": "s3cr3t"})
            elapsed = time.monotonic() - started
            events = await tap.poll()
            await tap.close()
            return events, elapsed

    events, elapsed = asyncio.run(main())
    assert events, "the tap saw nothing"
    assert len(events) <= 5 + int(5 * elapsed) + 1, (len(events), elapsed)  # 20 matched; the bucket let few by
    assert all(e["meta"]["customer"] == "c1" and "token" not in e["meta"] for e in events)
    assert all(e["name"] == "lookup" and e["args"] == "['c1']" for e in events)

    env = {**os.environ, **settings_env(mesh_settings)}
    proc = subprocess.Popen([sys.executable, "-m", "meshkit", "tap", "trace-b.lookup", "--where", "customer=c9",
                             "--json", "--count", "3"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        while "tapping" not in (line := proc.stderr.readline()):
            assert line, "meshkit tap exited before tapping"
        client = AsyncClient(mesh_settings)

        async def calls() -> None:
            async with client:
                for customer in ("c8", "c9", "c9", "c9", "c9"):
                    await client.call("trace-a", "order", [customer], meta={"customer": customer})
        asyncio.run(calls())
        out, _ = proc.communicate(timeout=WAIT)
        got = [json.loads(line) for line in out.splitlines()]
        assert len(got) == 3 and {e["meta"]["customer"] for e in got} == {"c9"} and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_level_for_one_customer_and_a_warning_per_failed_call(
        start_service: Any, mesh_settings: Settings, mesh_client: Any) -> None:
    [b] = start_service(B)
    set_rule = cli(mesh_settings, "log-level", "trace-b", "DEBUG", "--where", "customer=c1")
    assert set_rule.returncode == 0 and "DEBUG where {'customer': 'c1'}" in set_rule.stdout, set_rule
    for customer in ("c1", "c2", "c1", "c2"):
        mesh_client.call("trace-b", "lookup", [customer], meta={"customer": customer})
    with pytest.raises(HandlerError):
        mesh_client.call("trace-b", "fail", ["bad input"], meta={"customer": "c2"})

    def lines() -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in Path(b.log_path).read_text().splitlines() if raw.startswith("{")]

    def served() -> list[dict[str, Any]]:
        return [r for r in lines() if r["event"] == "call served" and r["method"] == "lookup"]

    def failed() -> list[dict[str, Any]]:
        return [r for r in lines() if r["event"] == "call failed"]

    wait_until(lambda: len(served()) >= 2 and failed(), WAIT, "the per-call log lines")
    assert len(served()) == 2 and all(r["level"] == "DEBUG" and r["logger"] == "meshkit.calls" for r in served())
    [warning] = failed()
    assert warning["level"] == "WARNING" and warning["status"] == "handler_error" and warning["trace_id"]
    assert warning["method"] == "fail" and warning["error"] == "bad input" and warning["duration_ms"] >= 0
    reset = cli(mesh_settings, "log-level", "trace-b", "reset", "--where", "customer=c1")
    assert reset.returncode == 0 and "where" not in reset.stdout, reset
