"""The benchmark scripts import, and the edge benchmark's baseline server answers.

The baseline (``bench/edge_baseline.py``) runs in-process on ``127.0.0.1``
port 0, driven by the same client code as the benchmark
(``bench/edge_clients.Lines``); each test takes milliseconds. The benchmarks
themselves are not tests and are not run here.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = ("edge", "edge_baseline", "edge_clients", "edge_scale", "edge_scale_stack", "edge_stack", "rpc",
           "rpc_clients", "rpc_peers", "rpc_report", "restarts")


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in SCRIPTS}
    finally:
        sys.path.remove(str(BENCH))


def test_every_bench_script_imports_and_parses_its_defaults(bench: dict[str, ModuleType]) -> None:
    args = bench["edge"].build_parser().parse_args([])
    assert args.fanout == "100,1000,5000" and args.conns == 64 and args.inflight == 8
    assert bench["rpc"].build_parser().parse_args([]).repeats >= 1


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_baseline_echoes_and_pushes_to_subscribers(bench: dict[str, ModuleType]) -> None:
    Lines = bench["edge_clients"].Lines

    async def scenario() -> tuple[Any, Any, Any, dict[str, Any]]:
        server = await bench["edge_baseline"].BaselineServer().start()
        try:
            subscriber = await Lines.open(*server.address)
            publisher = await Lines.open(*server.address)
            echoed = await subscriber.call("echo.echo", ["0123456789abcdef"])
            topics = await subscriber.call("mesh.subscribe", ["bench.tick"])
            reached = await publisher.call("bench.publish", ["bench.tick", {"seq": 7}])
            push = json.loads(await subscriber.reader.readline())
            subscriber.writer.close()
            publisher.writer.close()
            return echoed, topics, reached, push
        finally:
            await server.close()

    echoed, topics, reached, push = _run(scenario())
    assert echoed == "0123456789abcdef"
    assert topics == ["bench.tick"]
    assert reached == 1
    assert push == {"jsonrpc": "2.0", "method": "bench.tick", "params": {"seq": 7}}


def test_baseline_answers_bad_input_with_an_error_and_keeps_serving(bench: dict[str, ModuleType]) -> None:
    baseline = bench["edge_baseline"]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], bytes]:
        server = await baseline.BaselineServer().start()
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"not json\n")
            garbage = json.loads(await reader.readline())
            writer.write(b'{"method": "nope.nope", "id": 2}\n')
            unknown = json.loads(await reader.readline())
            writer.write(b'{"method": "echo.echo", "params": {"no": "list"}, "id": 4}\n')
            bad_params = json.loads(await reader.readline())
            writer.write(b'{"method": "echo.echo", "params": ["ok"], "id": 3}\n')
            after = json.loads(await reader.readline())
            writer.write(b"x" * (baseline.MAX_LINE + 10) + b"\n")
            closed = await reader.read()  # an over-long line closes the connection
            writer.close()
            return garbage, unknown, bad_params, after, closed
        finally:
            await server.close()

    garbage, unknown, bad_params, after, closed = _run(scenario())
    assert garbage["error"]["code"] == -32700
    assert unknown["error"]["code"] == -32601 and unknown["id"] == 2
    assert bad_params["error"]["code"] == -32602 and bad_params["id"] == 4
    assert after == {"jsonrpc": "2.0", "id": 3, "result": "ok"}
    assert closed == b""


def test_edge_summary_quotes_ratios_against_the_baseline(bench: dict[str, ModuleType]) -> None:
    edge = bench["edge"]
    cpu = {"gateways": 60.0, "backends": 40.0, "clients": 10.0}
    runs = {
        "seq:haproxy": [{"p50_us": 400.0, "p99_us": 900.0, "errors": 0, "cpu_us": cpu}],
        "seq:baseline": [{"p50_us": 100.0, "p99_us": 200.0, "errors": 0,
                          "cpu_us": {"server": 25.0, "clients": 10.0}}],
    }
    summary = edge.summarize(runs)
    assert summary["ratios"]["seq:haproxy:p50_us"] == 4.0
    assert summary["ratios"]["seq:haproxy:server_cpu_us"] == 4.0  # clients are not server CPU
    assert "haproxy" in edge.format_table(summary)


def test_fanout_subscriber_counts_pushes_split_across_reads(bench: dict[str, ModuleType],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    clients = bench["edge_clients"]

    async def scenario() -> Any:
        tally = clients.PushTally(expected=1)
        proto = clients.Subscriber(tally, "bench.tick")
        proto.data_received(b'{"jsonrpc":"2.0","id":1,"result":["bench.tick"]}\n{"jsonrpc":"2.0",')
        proto.data_received(b'"method":"bench.tick","params":{"seq": 4,"t":1.5}}\n')
        return proto.subscribed.result(), tally.counts

    subscribed, counts = asyncio.run(scenario())
    assert subscribed is True
    assert counts == {4: 1}
    assert json.loads(capsys.readouterr().out)["seq"] == 4  # the process reports push 4 complete


def test_the_scale_run_defaults_to_ten_thousand_clients_over_two_proxies(bench: dict[str, ModuleType]) -> None:
    args = bench["edge_scale"].build_parser().parse_args([])
    assert (args.clients, args.proxies, args.client_procs) == (10000, 2, 10)
    assert 0 < args.ramp_rate <= 1000, "the ramp is paced"


def test_the_scale_runs_proxies_listen_on_one_port_and_each_takes_connections(
    bench: dict[str, ModuleType],
) -> None:
    import socket

    socks = bench["edge_scale"].reuseport_sockets(2)
    clients: list[socket.socket] = []
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1 and 0 not in ports
        port = ports.pop()
        for s in socks:
            s.setblocking(False)
        accepted = [0, 0]
        for _ in range(64):  # the kernel spreads them by a hash of the 4-tuple
            clients.append(socket.create_connection(("127.0.0.1", port)))
            for i, s in enumerate(socks):
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                accepted[i] += 1
                conn.close()
        assert sum(accepted) == 64 and min(accepted) > 0, accepted
    finally:
        for c in clients:
            c.close()
        for s in socks:
            s.close()
