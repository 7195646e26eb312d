"""One gateway connection, driven over an in-process socket pair (no network, no Redis)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.gateway import GatewayOptions, jsonrpc
from meshkit.gateway.connection import Connection
from meshkit.gateway.jsonrpc import Request, RpcError
from meshkit.gateway.subscriptions import covered
from meshkit.metrics import Metrics

_WAIT = 5.0  # bound on every wait for something that must happen


class Client:
    """The client's end of the pair: write lines, read JSON lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), _WAIT)
        assert line, "connection closed"
        return json.loads(line)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), _WAIT) == b""


Call = Callable[[Connection, Request], Awaitable[Any]]


async def echo_call(conn: Connection, request: Request) -> Any:
    if request.method == "x.fail":
        raise RpcError(jsonrpc.TIMEOUT, "too late", {"code": "timeout"})
    if request.method == "x.nan":
        return float("nan")
    if request.method == "x.big":
        assert isinstance(request.params, list)
        return "x" * request.params[0]
    return {"method": request.method, "params": request.params, "conn": conn.id}


class CountingMetrics(Metrics):
    """Metrics that also count the lines a connection has read."""

    def __init__(self) -> None:
        super().__init__("", "", "gateway")
        self.lines_in = 0

    def gateway_message(self, direction: str) -> None:
        if direction == "in":
            self.lines_in += 1
        super().gateway_message(direction)


async def pair(call: Call = echo_call, clock: Callable[[], float] | None = None,
               metrics: Metrics | None = None,
               **options: Any) -> tuple[Connection, Client, asyncio.Task[None]]:
    a, b = socket.socketpair()
    # The client reads lines up to 4 MiB (asyncio's default limit is 64 KiB).
    client = Client(*await asyncio.open_connection(sock=b, limit=4 * 1024 * 1024))
    kwargs: dict[str, Any] = {"clock": clock} if clock else {}
    conn = Connection("gw1-1", options=GatewayOptions(**options), call=call,
                      metrics=metrics or Metrics("", "", "gateway"), gateway_id="gw1", **kwargs)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock=a)
    return conn, client, asyncio.create_task(conn.serve())


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def push_until_dropped(conn: Connection) -> None:
    """Push 8 KiB notifications nobody reads until the connection drops the client (bounded)."""
    line = jsonrpc.notification_line("jobs.big", "x" * 8192)
    sent = 0
    while conn.push("jobs.big", line):
        sent += 1
        assert sent < 10_000, "never dropped as a slow consumer"
    assert conn.closed


def req(rid: Any, method: str = "svc.m", params: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
    if params is not None:
        doc["params"] = params
    return doc


def test_requests_are_routed_and_answered_by_id() -> None:
    async def main() -> None:
        _conn, client, task = await pair()
        await client.send(req(1, "shares.submit", ["ab", "00ff00ff"]))
        answer = await client.recv()
        assert answer == {"jsonrpc": "2.0", "id": 1, "result": {
            "method": "shares.submit", "params": ["ab", "00ff00ff"], "conn": "gw1-1"}}
        await client.send(req("e", "x.fail"))
        error = (await client.recv())["error"]
        assert error == {"code": -32000, "message": "too late", "data": {"code": "timeout"}}
        await client.close()
        await task
    run(main())


def test_bad_lines_get_errors_and_the_connection_keeps_working() -> None:
    async def main() -> None:
        _conn, client, task = await pair(max_line=100)
        await client.send(b"this is not json\n")
        assert (await client.recv())["error"]["code"] == jsonrpc.PARSE_ERROR
        await client.send(b'{"jsonrpc":"2.0","id":3}\n')
        assert (await client.recv())["error"]["code"] == jsonrpc.INVALID_REQUEST
        # An over-long line, sent in pieces: one error as soon as it passes
        # the limit, the rest skipped up to the newline.
        await client.send(b"x" * 150)
        too_long = await client.recv()
        assert too_long["id"] is None and too_long["error"]["code"] == jsonrpc.LINE_TOO_LONG
        await client.send(b"y" * 500)
        await client.send(b'z"}\n' + json.dumps(req(4)).encode() + b"\n")
        assert (await client.recv())["id"] == 4
        # An over-long line arriving whole is rejected the same way.
        await client.send(b"q" * 300 + b"\n" + json.dumps(req(5)).encode() + b"\n")
        assert (await client.recv())["error"]["code"] == jsonrpc.LINE_TOO_LONG
        assert (await client.recv())["id"] == 5
        await client.close()
        await task
    run(main())


def test_in_flight_limit_rejects_the_extra_request_only() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(conn: Connection, request: Request) -> Any:
            await release.wait()
            return request.id

        conn, client, task = await pair(slow, max_inflight=3)
        for rid in range(4):
            await client.send(req(rid))
        rejected = await client.recv()
        assert rejected["id"] == 3 and rejected["error"]["code"] == jsonrpc.TOO_MANY_IN_FLIGHT
        assert conn.inflight == 3
        release.set()
        assert sorted([(await client.recv())["result"] for _ in range(3)]) == [0, 1, 2]
        await client.send(req(9))
        assert (await client.recv())["result"] == 9
        await client.close()
        await task
    run(main())


def test_batches_answer_in_one_array_without_notifications() -> None:
    async def main() -> None:
        _conn, client, task = await pair()
        batch = [req(1), {"jsonrpc": "2.0", "method": "svc.n"}, {"bad": True}, req(2, "mesh.hello")]
        await client.send(json.dumps(batch).encode() + b"\n")
        answers = await client.recv()
        assert [a.get("id") for a in answers] == [None, 2, 1]  # immediate ones first
        assert answers[0]["error"]["code"] == jsonrpc.INVALID_REQUEST
        assert answers[1]["result"]["connection"] == "gw1-1"
        await client.close()
        await task
    run(main())


def test_subscriptions_filter_pushes_and_are_limited_to_forwarded_topics() -> None:
    async def main() -> None:
        conn, client, task = await pair(topics=("jobs.*", "news"))
        line = jsonrpc.notification_line("jobs.notify", {"job_id": "a1"})
        assert not conn.push("jobs.notify", line)  # not subscribed yet
        await client.send(req(1, "mesh.subscribe", ["jobs.notify"]))
        assert (await client.recv())["result"] == ["jobs.notify"]
        await client.send(req(2, "mesh.subscribe", ["other.topic", "news"]))
        refused = await client.recv()
        assert refused["error"]["code"] == jsonrpc.INVALID_PARAMS
        assert "other.topic" in refused["error"]["message"]
        assert conn.push("jobs.notify", line)
        assert await client.recv() == {"jsonrpc": "2.0", "method": "jobs.notify",
                                       "params": {"job_id": "a1"}}
        assert not conn.push("jobs.other", jsonrpc.notification_line("jobs.other", 1))
        await client.send(req(3, "mesh.unsubscribe", {"topics": ["jobs.notify"]}))
        assert (await client.recv())["result"] == []
        await client.send(req(4, "mesh.nothing"))
        assert (await client.recv())["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
        await client.close()
        await task
    run(main())


@pytest.mark.parametrize("method", ["mesh.subscribe", "mesh.unsubscribe"])
@pytest.mark.parametrize("params", [
    {"topics": 5}, {"topics": True}, {"topics": {"a": 1}}, {"topics": "jobs.notify"},
    {"other": ["jobs.notify"]}, [5], [[1]], ["jobs.notify", ""], [["jobs.notify"], "news"],
])
def test_topics_of_the_wrong_shape_are_invalid_params_and_the_connection_stays(
    method: str, params: Any
) -> None:
    async def main() -> None:
        conn, client, task = await pair()
        await client.send(req(1, method, params))
        answer = await client.recv()
        assert answer["id"] == 1 and answer["error"]["code"] == jsonrpc.INVALID_PARAMS, answer
        assert answer["error"]["data"]["code"] == "invalid_params"
        await client.send(req(2, "mesh.subscribe", {"topics": ["jobs.notify"]}))
        assert (await client.recv())["result"] == ["jobs.notify"]
        assert not conn.closed
        await client.close()
        await task
    run(main())


def test_an_id_too_large_for_a_double_is_invalid_and_later_requests_are_answered() -> None:
    async def main() -> None:
        _conn, client, task = await pair()
        for method in ("svc.m", "mesh.hello"):
            await client.send(b'{"jsonrpc":"2.0","method":"%s","id":1e400}\n' % method.encode())
            invalid = await client.recv()
            assert invalid["id"] is None and invalid["error"]["code"] == jsonrpc.INVALID_REQUEST
        batch = [req(1), {"jsonrpc": "2.0", "method": "svc.m", "id": 1e400}, req(2, "mesh.hello")]
        await client.send(json.dumps(batch).replace("Infinity", "1e400").encode() + b"\n")
        answers = await client.recv()
        assert sorted(map(str, (a["id"] for a in answers))) == ["1", "2", "None"]
        await client.send(req(3))
        assert (await client.recv())["id"] == 3
        await client.close()
        await task
    run(main())


def test_an_answer_json_cannot_hold_costs_only_that_answer() -> None:
    async def main() -> None:
        _conn, client, task = await pair()
        await client.send(req(1, "x.nan"))
        alone = await client.recv()
        assert alone["id"] == 1 and alone["error"]["code"] == jsonrpc.INTERNAL_ERROR
        await client.send(json.dumps([req(2, "x.nan"), req(3), req(4, "mesh.hello")]).encode() + b"\n")
        answers = {a["id"]: a for a in await client.recv()}
        assert answers[2]["error"]["code"] == jsonrpc.INTERNAL_ERROR
        assert answers[3]["result"]["method"] == "svc.m" and "result" in answers[4]
        await client.close()
        await task
    run(main())


def test_a_failing_built_in_is_answered_as_an_internal_error() -> None:
    async def main() -> None:
        conn, client, task = await pair()

        def broken(request: Request) -> Any:
            raise ZeroDivisionError("a bug")

        conn._builtin = broken  # type: ignore[method-assign]
        await client.send(req(1, "mesh.hello"))
        answer = await client.recv()
        assert answer["id"] == 1 and answer["error"]["code"] == jsonrpc.INTERNAL_ERROR
        await client.send(req(2))
        assert (await client.recv())["id"] == 2
        await client.close()
        await task
    run(main())


def test_subscriptions_per_connection_are_capped() -> None:
    async def main() -> None:
        conn, client, task = await pair(topics=("jobs.*",), max_subscriptions=3)
        await client.send(req(1, "mesh.subscribe", ["jobs.a", "jobs.b"]))
        assert (await client.recv())["result"] == ["jobs.a", "jobs.b"]
        await client.send(req(2, "mesh.subscribe", ["jobs.c", "jobs.d"]))
        refused = await client.recv()
        assert refused["error"]["code"] == jsonrpc.INVALID_PARAMS
        assert refused["error"]["data"] == {"code": "invalid_params", "max_subscriptions": 3}
        assert conn.subscriptions == {"jobs.a", "jobs.b"}  # none of the refused call's added
        await client.send(req(3, "mesh.subscribe", ["jobs.a", "jobs.c"]))  # one new: fits
        assert (await client.recv())["result"] == ["jobs.a", "jobs.b", "jobs.c"]
        await client.send(req(4, "mesh.unsubscribe", ["jobs.a"]))
        await client.recv()
        await client.send(req(5, "mesh.subscribe", ["jobs.d"]))
        assert (await client.recv())["result"] == ["jobs.b", "jobs.c", "jobs.d"]
        await client.close()
        await task
    run(main())


def test_a_burst_of_lines_lets_other_work_run_in_between() -> None:
    async def main() -> None:
        metrics = CountingMetrics()
        _conn, client, task = await pair(metrics=metrics)
        lines = 2000  # ~96 KiB: more than one read's worth of short lines
        seen: list[int] = []

        async def other_work() -> None:
            while metrics.lines_in < lines:
                seen.append(metrics.lines_in)
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        client.writer.write((json.dumps(req(1, "mesh.hello")) + "\n").encode() * lines)
        for _ in range(lines):
            assert (await client.recv())["id"] == 1
        await asyncio.wait_for(other, _WAIT)
        steps = [b - a for a, b in zip([0, *seen], [*seen, lines], strict=True)]
        assert max(steps) <= 64, f"{max(steps)} lines handled without letting other work run"
        await client.close()
        await task
    run(main())


def test_a_client_that_pipelines_without_reading_is_slowed_not_dropped() -> None:
    async def main() -> None:
        # Reading pauses at half of max_output, well before the drop.
        conn, client, task = await pair(max_output=32 * 1024)
        lines = 3000  # answers: ~280 KiB, all sent before the client reads any
        client.writer.write((json.dumps(req(1, "mesh.hello")) + "\n").encode() * lines)
        for _ in range(lines):
            assert (await client.recv())["id"] == 1
        assert not conn.closed
        await client.close()
        await task
    run(main())


def test_one_answer_larger_than_max_output_reaches_a_client_that_reads() -> None:
    async def main() -> None:
        conn, client, task = await pair(max_output=64 * 1024)
        size = 1024 * 1024
        await client.send(req(1, "x.big", [size]))
        assert len((await client.recv())["result"]) == size
        await client.send(req(2, "x.big", [size]))  # and again: nothing carried over
        assert len((await client.recv())["result"]) == size
        await client.send(req(3))
        assert (await client.recv())["id"] == 3
        assert not conn.closed
        await client.close()
        await task
    run(main())


def test_a_client_that_stops_reading_after_a_big_answer_is_still_dropped() -> None:
    async def main() -> None:
        conn, client, task = await pair(max_output=64 * 1024)
        conn.subscriptions.add("jobs.big")
        assert conn.push("jobs.big", jsonrpc.notification_line("jobs.big", "x" * 1024 * 1024))
        push_until_dropped(conn)
        await task
        await client.close()
    run(main())


def test_eof_answers_requests_in_flight_before_closing() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(conn: Connection, request: Request) -> Any:
            await release.wait()
            return "done"

        conn, client, task = await pair(slow)
        await client.send(req(1))
        client.writer.write_eof()
        await asyncio.sleep(0)
        assert not conn.closed
        release.set()
        assert (await client.recv())["result"] == "done"
        assert await client.eof()
        await task
        assert conn.closed and conn.done.is_set()
        await client.close()
    run(main())


def test_finish_warns_then_answers_everything_already_sent_then_closes() -> None:
    async def main() -> None:
        release = asyncio.Event()
        started = asyncio.Event()

        async def slow(conn: Connection, request: Request) -> Any:
            started.set()
            if request.id == 1:
                await release.wait()
            return f"answer {request.id}"

        conn, client, task = await pair(slow)
        await client.send(req(1))
        await asyncio.wait_for(started.wait(), _WAIT)
        finishing = asyncio.create_task(conn.finish(jsonrpc.SHUTTING_DOWN, "bye", wait=_WAIT,
                                                    linger=_WAIT))
        notice = await client.recv()
        assert notice["id"] is None and notice["error"]["code"] == jsonrpc.SHUTTING_DOWN
        # Sent before the client acted on the notice: still answered.
        await client.send(req(2))
        assert (await client.recv())["result"] == "answer 2"
        client.writer.write_eof()  # the client's reaction: it closes its side
        release.set()
        assert (await client.recv())["result"] == "answer 1"
        assert await client.eof()
        await finishing
        await task
        await client.close()
    run(main())


def test_finish_stops_reading_after_the_linger() -> None:
    async def main() -> None:
        conn, client, task = await pair()
        await conn.finish(jsonrpc.SHUTTING_DOWN, "bye", wait=_WAIT, linger=0.0)
        assert (await client.recv())["error"]["code"] == jsonrpc.SHUTTING_DOWN
        assert await client.eof()
        await task
        await client.close()
    run(main())


def test_idle_uses_the_injected_clock_and_ignores_busy_connections() -> None:
    async def main() -> None:
        now = [100.0]
        conn, client, task = await pair(clock=lambda: now[0], idle_timeout=30.0)
        assert not conn.idle(129.9) and conn.idle(130.0)
        now[0] = 200.0
        await client.send(req(1, "mesh.hello"))
        await client.recv()
        assert not conn.idle(229.0) and conn.idle(230.0)
        conn.inflight = 1
        assert not conn.idle(1000.0)
        conn.inflight = 0
        await client.close()
        await task
    run(main())


def test_a_client_that_does_not_read_is_dropped_as_a_slow_consumer() -> None:
    async def main() -> None:
        conn, client, task = await pair(max_output=64 * 1024)
        conn.subscriptions.add("jobs.big")
        push_until_dropped(conn)
        await task
        await client.close()
    run(main())


def test_covered_topics() -> None:
    allowed = ["jobs.*", "news"]
    assert covered(allowed, "jobs.notify") and covered(allowed, "jobs.*")
    assert covered(allowed, "jobs.a.*") and covered(allowed, "news")
    assert not covered(allowed, "news.*") and not covered(allowed, "job")
    assert not covered(allowed, "*") and not covered(allowed, "other.*")


def test_options_from_table_and_environment() -> None:
    settings = Settings.load(env={}, service_overrides={"gateway": {
        "topics": ["jobs.*", "news"], "max_line": 2048, "idle_timeout": 5}})
    options = GatewayOptions.from_settings(settings, env={
        "MESHKIT_GATEWAY_MAX_LINE": "4096", "MESHKIT_GATEWAY_SERVICES": "shares, jobs"})
    assert options.topics == ("jobs.*", "news")
    assert options.max_line == 4096 and options.idle_timeout == 5.0
    assert options.services == ("shares", "jobs") and options.listener == "stratum"
    with pytest.raises(ConfigError):
        GatewayOptions.from_settings(settings, env={"MESHKIT_GATEWAY_MAX_INFLIGHT": "lots"})
    with pytest.raises(ConfigError):
        GatewayOptions(max_inflight=0)


def test_the_gateway_package_surface_is_pinned() -> None:
    import meshkit.gateway

    assert sorted(meshkit.gateway.__all__) == [
        "ConnectionGoneError", "ConnectionState", "ConnectionStore", "Gateway", "GatewayOptions",
        "NoConnectionError", "gateway_of", "pooled_redis", "push_to_connection"]


class RejectCounting(Metrics):
    """Metrics that count every rejected item (invalid batch items are rejected one by one)."""

    def __init__(self) -> None:
        super().__init__("", "", "gateway")
        self.rejected = 0

    def gateway_rejected(self, reason: str) -> None:
        self.rejected += 1
        super().gateway_rejected(reason)


def test_batch_items_count_against_the_fairness_budget() -> None:
    async def main() -> None:
        metrics = RejectCounting()
        _conn, client, task = await pair(metrics=metrics)
        lines, items = 40, 64
        batch = (json.dumps([{"bad": i} for i in range(items)]) + "\n").encode()
        seen: list[int] = []

        async def other_work() -> None:
            while metrics.rejected < lines * items:
                seen.append(metrics.rejected)
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        client.writer.write(batch * lines)
        for _ in range(lines):
            assert len(await client.recv()) == items
        await asyncio.wait_for(other, _WAIT)
        steps = [b - a for a, b in zip([0, *seen], [*seen, lines * items], strict=True)]
        assert max(steps) <= 64, f"{max(steps)} batch items handled without letting other work run"
        await client.close()
        await task
    run(main())


def test_a_batch_over_max_batch_is_refused_whole_and_the_connection_stays() -> None:
    async def main() -> None:
        calls: list[Any] = []

        async def counting(conn: Connection, request: Request) -> Any:
            calls.append(request.id)
            return request.id

        _conn, client, task = await pair(counting, max_batch=4)
        await client.send(json.dumps([req(i) for i in range(5)]).encode() + b"\n")
        refused = await client.recv()
        assert refused["id"] is None and refused["error"]["code"] == jsonrpc.BATCH_TOO_LARGE
        assert refused["error"]["data"] == {"code": "batch_too_large", "max_batch": 4}
        await client.send(json.dumps([req(i) for i in range(4)]).encode() + b"\n")
        assert sorted(a["result"] for a in await client.recv()) == [0, 1, 2, 3]
        assert calls and sorted(calls) == [0, 1, 2, 3]  # nothing of the refused batch ran
        await client.close()
        await task
    run(main())


def test_a_line_of_invalid_items_cannot_amplify_into_a_big_answer() -> None:
    async def main() -> None:
        _conn, client, task = await pair()
        flood = b"[" + b"{}," * 5000 + b"{}]\n"  # ~15 KiB: used to be answered with ~700 KiB
        await client.send(flood)
        answer = await client.recv()
        assert answer["error"]["code"] == jsonrpc.BATCH_TOO_LARGE
        # The largest batch allowed, of invalid items with the longest ids that fit in a line.
        rid = "i" * 200
        await client.send(json.dumps([{"id": rid}] * 64).encode() + b"\n")
        client.writer.write(b"")
        line = await asyncio.wait_for(client.reader.readline(), _WAIT)
        assert len(json.loads(line)) == 64 and len(line) < 2 * 16384
        await client.close()
        await task
    run(main())


def test_a_batch_answer_larger_than_max_output_is_cut_to_fit() -> None:
    async def main() -> None:
        conn, client, task = await pair(max_output=1024 * 1024)
        big = 600 * 1024
        await client.send(json.dumps([req(1, "x.big", [big]), req(2, "x.big", [big]), req(3)]).encode()
                          + b"\n")
        line = await asyncio.wait_for(client.reader.readline(), _WAIT)
        assert len(line) <= 1024 * 1024
        answers = {a["id"]: a for a in json.loads(line)}
        assert sorted(answers) == [1, 2, 3] and answers[3]["result"]["method"] == "svc.m"
        assert sum("error" in answers[i] for i in (1, 2)) == 1
        assert not conn.closed
        await client.close()
        await task
    run(main())


def test_a_close_that_cannot_flush_resets_within_close_timeout_and_counts_until_then() -> None:
    async def main() -> None:
        conn, client, task = await pair(close_timeout=0.3, max_output=64 * 1024 * 1024)
        assert conn._transport is not None
        sock = conn._transport.get_extra_info("socket")
        conn.send(b"x" * (8 * 1024 * 1024) + b"\n")  # the client reads none of it
        conn.close(jsonrpc.IDLE_TIMEOUT, "idle")
        await asyncio.sleep(0)
        # Still holding the socket while it tries to flush: the connection counts.
        assert not conn.done.is_set() and sock.fileno() != -1
        await asyncio.wait_for(conn.done.wait(), 0.3 + _WAIT)
        assert sock.fileno() == -1, "done, but the socket is still open"
        await task
        await client.close()
    run(main())


def test_a_close_that_flushes_sends_everything_and_the_closing_error() -> None:
    async def main() -> None:
        conn, client, task = await pair(close_timeout=_WAIT)
        conn.send(b'"' + b"y" * (1024 * 1024) + b'"\n')
        conn.close(jsonrpc.IDLE_TIMEOUT, "idle")
        assert len(await client.recv()) == 1024 * 1024
        assert (await client.recv())["error"]["code"] == jsonrpc.IDLE_TIMEOUT
        assert await client.eof()
        await asyncio.wait_for(conn.done.wait(), _WAIT)
        await task
        await client.close()
    run(main())


def haproxy_check(**check: Any) -> tuple[bytes, bytes] | None:
    """What the rendered HAProxy configuration's tcp-check sends and expects (None: no such check)."""
    from pathlib import Path

    from meshkit.haproxy.config import parse_proxy_config
    from meshkit.haproxy.model import build_model
    from meshkit.haproxy.render import RuntimePaths, render

    repo = Path(__file__).resolve().parents[2]
    config = parse_proxy_config({"haproxy": {"templates": str(repo / "haproxy"), "check": check},
                                 "frontend": [{"name": "stratum", "bind": "127.0.0.1:1",
                                               "service": "gateway", "listener": "stratum"}]}, repo)
    text = render(build_model(config, []), RuntimePaths.in_dir("/tmp/meshkit-unit"))
    send = [line for line in text.splitlines() if line.strip().startswith("tcp-check send ")]
    expect = [line for line in text.splitlines() if line.strip().startswith("tcp-check expect string ")]
    if not send:
        return None

    def unquote(line: str, prefix: str) -> bytes:
        # HAProxy's double-quoted strings: \" and \n are the only escapes used.
        quoted = line.strip()[len(prefix):]
        assert quoted.startswith('"') and quoted.endswith('"')
        return quoted[1:-1].replace('\\"', '"').replace("\\n", "\n").encode()

    return unquote(send[0], "tcp-check send "), unquote(expect[0], "tcp-check expect string ")


def test_the_gateway_answers_the_health_check_haproxy_is_configured_with() -> None:
    check = haproxy_check()
    assert check is not None
    request, expected = check
    assert request.endswith(b"\n") and request.count(b"\n") == 1

    async def main() -> None:
        _conn, client, task = await pair()
        client.writer.write(request)
        line = await asyncio.wait_for(client.reader.readline(), _WAIT)
        assert expected in line, (request, line)
        assert line == b'{"jsonrpc":"2.0","id":"haproxy-check","result":"pong"}\n'
        await client.close()
        await task
    run(main())
    assert haproxy_check(tcp_check="connect") is None


def test_check_settings_are_validated() -> None:
    from pathlib import Path

    from meshkit.haproxy.config import parse_proxy_config

    repo = Path(__file__).resolve().parents[2]
    frontend = [{"name": "stratum", "bind": "127.0.0.1:1", "service": "gateway", "listener": "stratum"}]
    for bad in ({"tcp_check": "ping"}, {"fastinter": "soon"}):
        with pytest.raises(ConfigError):
            parse_proxy_config({"haproxy": {"check": bad}, "frontend": frontend}, repo)
    config = parse_proxy_config({"haproxy": {"check": {"fastinter": "100ms"}}, "frontend": frontend}, repo)
    assert config.check.server_options == "check inter 500ms fastinter 100ms fall 2 rise 1"


def test_method_names_are_clipped_in_errors() -> None:
    async def main() -> None:
        _conn, client, task = await pair()
        await client.send(req(1, "mesh." + "n" * 10_000))
        answer = await client.recv()
        assert answer["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
        assert len(answer["error"]["message"]) < 300
        await client.close()
        await task
    run(main())


def test_the_idle_sweep_survives_an_exception_and_is_restarted() -> None:
    from meshkit.gateway import Gateway

    class Poisoned:
        """A connection whose state makes the sweep raise once (bad data), then is idle."""

        id, peer = "gw-x", "127.0.0.1:9"

        def __init__(self) -> None:
            self.checks = 0
            self.closed = asyncio.Event()

        def idle(self, now: float) -> bool:
            self.checks += 1
            if self.checks == 1:
                raise ValueError("bad data")
            return True

        def close(self, code: int | None = None, message: str = "", *, abort: bool = False) -> None:
            assert code == jsonrpc.IDLE_TIMEOUT
            self.closed.set()

    async def main() -> None:
        gateway = Gateway(Settings.load(env={}, service_overrides={"gateway": {"idle_timeout": 0.2}}))

        async def listen(host: str, ports: list[int]) -> int:
            return 1  # no socket in unit tests

        async def no_sweep() -> int:
            return 0

        async def no_ban_sync() -> None:  # no Redis in unit tests
            return None

        gateway.tcp.start = listen  # type: ignore[method-assign]
        gateway.sweep_state = no_sweep  # type: ignore[method-assign]
        gateway._ban_sync.run = no_ban_sync  # type: ignore[method-assign]
        poisoned = Poisoned()
        gateway.connections["gw-x"] = poisoned  # type: ignore[assignment]
        await gateway.on_start()
        try:
            await asyncio.wait_for(poisoned.closed.wait(), _WAIT)
            idle_loop = next(b for b in gateway._background if b.name == "gateway-idle")
            assert idle_loop.restarts == 1 and "bad data" in idle_loop.crashes[0].error
        finally:
            for loop in gateway._background:
                loop.cancel()
            await asyncio.gather(*(b.task for b in gateway._background if b.task), return_exceptions=True)
            gateway._executor.shutdown()
            gateway._zmq.term()
    run(main())


def test_every_option_is_documented_with_its_default() -> None:
    from dataclasses import fields
    from pathlib import Path

    import meshkit.gateway.options as module

    doc = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    for field in fields(GatewayOptions):
        assert f"| `{field.name}` |" in doc, field.name
        assert field.name in (module.__doc__ or ""), field.name
    assert "| `max_batch` | `64` |" in doc and "| `close_timeout` | `5` |" in doc


def test_batch_calls_count_against_the_in_flight_limit() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(conn: Connection, request: Request) -> Any:
            await release.wait()
            return request.id

        conn, client, task = await pair(slow, max_inflight=3)
        await client.send(req("single"))
        await client.send(json.dumps([req(i) for i in range(4)]).encode() + b"\n")
        await client.send(req("late"))
        assert (await client.recv())["error"]["code"] == jsonrpc.TOO_MANY_IN_FLIGHT  # "late"
        assert conn.inflight == 3
        release.set()
        answers = [await client.recv() for _ in range(2)]
        batch = next(a for a in answers if isinstance(a, list))
        assert [a.get("result") for a in batch] == [None, None, 0, 1]  # refused ones first
        assert [a["error"]["code"] for a in batch[:2]] == [jsonrpc.TOO_MANY_IN_FLIGHT] * 2
        await client.close()
        await task
    run(main())


def test_options_read_the_environment_only_through_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHKIT_GATEWAY_MAX_LINE", "4096")
    assert GatewayOptions.from_settings(Settings.load(env={})).max_line == GatewayOptions().max_line
    assert GatewayOptions.from_settings(Settings.load()).max_line == 4096


def test_a_connection_whose_socket_closed_before_it_was_made_ends_quietly() -> None:
    """uvloop refuses settings on a closed transport: a client gone before the accept ran (seen
    under load in the restart proof) must not raise from the constructor, only end."""
    import uvloop

    async def main() -> None:
        a, b = socket.socketpair()
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, sock=a)
        transport.abort()  # gone before the gateway handed it to its Connection
        b.close()
        await asyncio.sleep(0)
        conn = Connection("gw1-1", options=GatewayOptions(), call=echo_call,
                          metrics=Metrics("", "", "gateway"), gateway_id="gw1", peer="127.0.0.1:1")
        conn.connection_made(transport)
        await asyncio.wait_for(conn.serve(), 5)
        assert conn.closed

    uvloop.run(main())
