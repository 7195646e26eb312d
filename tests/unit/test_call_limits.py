"""Limits a server applies before a handler runs: concurrency gates, typed arguments (in-process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import zmq
from serverkit import FakePump, answers, settle

from meshkit import wire
from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.handlers import HandlerTable, rpc
from meshkit.metrics import Metrics
from meshkit.server import Server

PEER = b"\x00peer"


class Limited:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0
        self.most = 0
        self.ran = 0

    @rpc(max_concurrency=2, max_queued=3)
    async def hold(self, i: int = 0, blob: Any = None) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        self.ran += 1
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return i

    @rpc
    async def free(self, i: int = 0, blob: Any = None) -> int:
        await self.gate.wait()
        return i

    @rpc
    async def typed(self, n: int, s: str) -> str:
        return s * n

    @rpc
    def typed_plain(self, ratio: float, pair: tuple[int, int]) -> list[Any]:
        return [type(ratio).__name__, type(pair).__name__]


@contextmanager
def limited_server(**overrides: Any) -> Iterator[tuple[Server, Limited, FakePump]]:
    svc = Limited()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    executor = ThreadPoolExecutor(2)
    server = Server("limited", HandlerTable.collect(svc), Settings(**overrides), ctx, executor, Metrics("", "", ""))
    pump = FakePump()
    server.pump = pump  # type: ignore[assignment]
    try:
        yield server, svc, pump
    finally:
        for task in server._tasks:
            task.cancel()
        server.sock.close(linger=0)
        ctx.term()
        executor.shutdown(wait=True)


def call(id: int, method: str, *args: Any, timeout_ms: int | None = 5000, **kwargs: Any) -> list[bytes]:
    return [PEER, *wire.encode_call(id, "limited", method, list(args), kwargs, timeout_ms, None, None)]


def codes(pump: FakePump) -> dict[int, str]:
    return {h.id: (body["code"] if h.kind == wire.ERROR else "REPLY") for h, body in answers(pump)}


async def turns() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_past_a_methods_limit_calls_queue_and_past_its_queue_are_overloaded_at_once() -> None:
    async def main() -> None:
        with limited_server() as (server, svc, pump):
            for i in range(8):
                server._on_message(call(i, "hold", i))
            await turns()
            assert (svc.running, svc.ran) == (2, 2)
            # 2 run, 3 queue, 3 refused at once, none of which ran
            assert codes(pump) == {5: "overloaded", 6: "overloaded", 7: "overloaded"}
            body = answers(pump)[0][1]
            assert "method hold: 2 calls running (limit 2) and 3 queued (limit 3)" in body["message"]
            # Queued calls count as in flight: PONG's inflight is running + queued.
            server._on_message([PEER, *wire.encode_ping(99)])
            pong = [b for h, b in answers(pump) if h.kind == wire.PONG]
            assert pong == [["up", 5]] and server.limits.load == 5
            svc.gate.set()
            await settle(server)
            assert svc.most == 2 and svc.ran == 5
            assert sorted(k for k, v in codes(pump).items() if v == "REPLY") == [0, 1, 2, 3, 4, 99]  # 99: the PONG
            assert server.limits.load == 0 and server.held.count == 0

    asyncio.run(main())


def test_the_service_limit_covers_every_method_and_its_queue_is_bounded_in_bytes() -> None:
    async def main() -> None:
        with limited_server(max_concurrency=1, max_queued_calls=100, max_queued_call_bytes=30_000) as (
                server, svc, pump):
            server._on_message(call(1, "free"))
            server._on_message(call(2, "free", blob=b"x" * 10_000))
            server._on_message(call(3, "hold", blob=b"x" * 10_000))
            server._on_message(call(4, "free", blob=b"x" * 10_000))
            await turns()
            assert codes(pump) == {4: "overloaded"}
            assert "bytes queued (limit 30000)" in answers(pump)[0][1]["message"]
            svc.gate.set()
            await settle(server)
            assert codes(pump) == {1: "REPLY", 2: "REPLY", 3: "REPLY", 4: "overloaded"}

    asyncio.run(main())


def test_a_queued_call_whose_deadline_passes_is_answered_deadline_exceeded() -> None:
    async def main() -> None:
        with limited_server() as (server, svc, pump):
            server._on_message(call(1, "hold"))
            server._on_message(call(2, "hold"))
            server._on_message(call(3, "hold", timeout_ms=50))
            await asyncio.sleep(0.2)  # the real clock: this server runs on it
            assert codes(pump) == {3: "deadline_exceeded"} and svc.ran == 2
            svc.gate.set()
            await settle(server)

    asyncio.run(main())


def test_typed_arguments_are_refused_naming_the_parameter_before_the_handler_runs() -> None:
    async def main() -> None:
        with limited_server() as (server, _svc, pump):
            server._on_message(call(1, "typed", "5", 6))
            server._on_message(call(2, "typed", 2, "ab"))
            server._on_message(call(3, "typed", 2, s=7))
            server._on_message(call(4, "typed_plain", 3, [1, 2]))
            server._on_message(call(5, "typed_plain", 3, [1, "x"]))
            await settle(server)
            replies = {h.id: body for h, body in answers(pump)}
            assert replies[1] == {"code": "bad_arguments",
                                  "message": "parameter 'n' expects int: Expected `int`, got `str`"}
            assert replies[2] == "abab"
            assert replies[3]["message"].startswith("parameter 's' expects str")
            assert replies[4] == ["float", "tuple"]  # converted where unambiguous
            assert replies[5]["code"] == "bad_arguments" and "'pair' expects tuple[int, int]" in replies[5]["message"]

    asyncio.run(main())


def test_signatures_are_json_data_with_the_limits() -> None:
    table = HandlerTable.collect(Limited())
    hold = table.methods["hold"].signature()
    assert json.loads(json.dumps(hold)) == hold
    assert hold["max_concurrency"] == 2 and hold["text"] == "(i: int = 0, blob = None) -> int"
    assert table.methods["typed"].signature()["params"][1] == {
        "name": "s", "kind": "positional_or_keyword", "type": "str", "schema": {"type": "string"}}


def test_a_method_using_an_unconfigured_resource_stops_the_server_from_starting() -> None:
    class Pays:
        @rpc(uses={"payments_api": 1})
        async def pay(self) -> None:
            pass

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with pytest.raises(ConfigError, match=r"method 'pay' uses \['payments_api'\], which have no"):
            Server("pays", HandlerTable.collect(Pays()), Settings(), ctx, ThreadPoolExecutor(1), Metrics("", "", ""))
    finally:
        ctx.term()


@pytest.mark.parametrize("options", [{"max_concurrency": -1}, {"max_concurrency": 1.5}, {"max_queued": -2},
                                     {"uses": {"x": 0}}, {"uses": {"": 1}}, {"uses": {"x": True}}], ids=repr)
def test_bad_decorator_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        rpc(**options)


@pytest.mark.parametrize("table", [{"rate": -1}, {}, {"rate": 5, "window": 0}, {"concurrency": 2, "lease_ttl": 0.1},
                                   {"rate": "lots"}, {"rate": 1, "burst": 3}], ids=repr)
def test_bad_resource_tables_are_config_errors(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Settings(resources={"payments_api": table})


def test_resource_tables_are_read_from_the_config_file(tmp_path: Any) -> None:
    path = tmp_path / "meshkit.toml"
    path.write_text('[resources.payments_api]\nrate = 50\nconcurrency = 4\n')
    limits = Settings.load(path, env={}).resource_limits()
    assert limits["payments_api"].rate == 50 and limits["payments_api"].concurrency == 4


def test_a_gateway_client_gets_resource_exhausted_as_its_own_json_rpc_code() -> None:
    from meshkit.errors import RefusedError, ResourceExhaustedError
    from meshkit.gateway.jsonrpc import RESOURCE_EXHAUSTED, error_for

    exc = ResourceExhaustedError("resource 'payments_api' is at its cluster-wide rate of 5/s")
    assert error_for(exc) == (RESOURCE_EXHAUSTED, "resource 'payments_api' is at its cluster-wide rate of 5/s",
                              {"code": "resource_exhausted"})
    assert error_for(RefusedError("low difficulty", client_code=23))[0] == 23  # other refusals as before


def test_the_record_carries_signatures_only_while_it_fits() -> None:
    from meshkit.record import MAX_RECORD_BYTES, InstanceRecord

    record = InstanceRecord("limited", "abc123", "tcp://127.0.0.1:5000", "host", 1, methods=("typed",))
    with_sig = record.with_signatures({"typed": "(n: int, s: str) -> str"})
    assert InstanceRecord.from_json(with_sig.to_json()).signatures == {"typed": "(n: int, s: str) -> str"}
    many = {f"m{i}": "(" + "x" * 290 + ")" for i in range(MAX_RECORD_BYTES // 250)}
    assert record.with_signatures(many) is record  # no room: the record goes without
    with pytest.raises(ValueError, match="signatures"):
        InstanceRecord.from_json(with_sig.to_json().replace("(n: int", "(\\u0000n"))


def test_a_service_default_concurrency_comes_from_its_services_table() -> None:
    settings = Settings(service_overrides={"limited": {"max_concurrency": 3, "max_queued_calls": 7}})
    own = settings.for_service("limited")
    assert (own.max_concurrency, own.max_queued_calls) == (3, 7)
    assert settings.for_service("other").max_concurrency == 0

    async def main() -> None:
        with limited_server(max_concurrency=3, max_queued_calls=7) as (server, svc, pump):
            for i in range(12):
                server._on_message(call(i, "free", i))
            await turns()
            assert (server.limits.service.running, server.limits.service.queued) == (3, 7)
            assert sorted(codes(pump)) == [10, 11]
            svc.gate.set()
            await settle(server)

    asyncio.run(main())
