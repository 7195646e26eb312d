"""What a peer can make a server hold, and what the server echoes and logs (in-process)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from serverkit import answers, call, probe_server, push, settle

from meshkit import wire

A, B = b"\x00peer-a", b"\x00peer-b"


def _codes(replies: list[tuple[wire.Header, Any]]) -> list[str]:
    return [body["code"] if header.kind == wire.ERROR else wire.KIND_NAMES[header.kind] for header, body in replies]


def test_calls_in_flight_per_connection_are_bounded_in_count() -> None:
    async def main() -> None:
        with probe_server(max_calls_per_peer=5) as (server, probe, pump):
            for i in range(8):
                server._on_message([A, *call(i, "wait")])
            server._on_message([B, *call(100, "echo", "hi")])  # another connection is not affected
            await asyncio.sleep(0)
            assert _codes(answers(pump, A)) == ["overloaded"] * 3
            assert answers(pump, B)[0][1] == "hi"
            probe.gate.set()
            await settle(server)
            assert sorted(_codes(answers(pump, A))) == ["REPLY"] * 5 + ["overloaded"] * 3
            assert (server.held.count, server.held.bytes, server.quota.connections) == (0, 0, 0)

    asyncio.run(main())


def test_calls_in_flight_per_connection_are_bounded_in_bytes() -> None:
    async def main() -> None:
        with probe_server(max_call_bytes_per_peer=64 * 1024) as (server, probe, pump):
            for i in range(4):
                server._on_message([A, *call(i, "wait", b"x" * 20_000)])
            assert _codes(answers(pump, A)) == ["overloaded"] * 2  # 2 x (20 KB + 3 KiB) fit, a third does not
            assert "bytes" in answers(pump, A)[0][1]["message"]
            probe.gate.set()
            await settle(server)

    asyncio.run(main())


def test_a_flood_of_calls_is_bounded_by_the_instance_total_too() -> None:
    # 100,000 calls from one raw peer took +339 MiB: nothing bounded calls in flight.
    async def main() -> None:
        with probe_server(max_calls_per_peer=10**9, max_inflight=1000) as (server, probe, pump):
            for i in range(5000):
                server._on_message([A, *call(i, "wait")])
            assert server.inflight == 1000
            assert server.held.bytes <= 1000 * 4096
            assert _codes(answers(pump, A)) == ["overloaded"] * 4000
            probe.gate.set()
            await settle(server)
            assert server.held.count == 0

    asyncio.run(main())


def test_push_queue_is_bounded_in_bytes() -> None:
    # 1,000 x 512 KiB pushes grew a subscriber by 525 MiB: the queue counted messages only.
    async def main() -> None:
        with probe_server(max_queued_push_bytes=2 * 1024 * 1024) as (server, probe, pump):
            for i in range(1000):
                server._on_message([A, *push(i, "jobs.new", b"x" * 512 * 1024)])
            assert server._pushes.queued(A)[1] <= 2 * 1024 * 1024
            refused = _codes(answers(pump, A))
            assert set(refused) == {"overloaded"} and len(refused) == 1000 - server._pushes.queued(A)[0]
            probe.gate.set()
            await settle(server)
            assert len(probe.pushed) == 1000 - len(refused)
            assert server.held.count == 0 and not server._pushes.busy

    asyncio.run(main())


def test_full_push_queue_is_logged_once_per_episode_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    # The warning used to be written for every refused push: 10,002 lines for one burst.
    async def main() -> None:
        with probe_server(max_queued_pushes=10) as (server, probe, _pump):
            for i in range(10_012):
                server._on_message([A, *push(i, "jobs.new", i)])
            probe.gate.set()
            await settle(server)
            server._on_message([A, *push(99_999, "jobs.new", 0)])  # accepted: the episode is over
            await settle(server)

    with caplog.at_level(logging.WARNING, logger="meshkit.server"):
        asyncio.run(main())
    lines = [r for r in caplog.records if "push" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in lines] == [
        "refusing pushes until they drain",
        "push queue of one connection takes pushes again; 10002 were refused meanwhile",
    ]
    assert lines[1].refused == 10_002  # type: ignore[attr-defined]


def test_huge_method_name_gets_a_short_error_and_a_short_throttled_log(caplog: pytest.LogCaptureFixture) -> None:
    # A 4 MiB method name came back as a 4 MiB error message and a 4 MiB WARNING, per message.
    async def main() -> None:
        with probe_server(max_header_size=8 << 20, max_name_length=8 << 20) as (server, _probe, pump):
            for i in range(50):
                server._on_message([A, *call(i, "m" * (4 << 20))])
            replies = answers(pump, A)
            assert _codes(replies) == ["unknown_method"] * 50
            assert all(len(body["message"]) < 300 for _, body in replies)

    with caplog.at_level(logging.WARNING, logger="meshkit.server"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and len(lines[0]) < 400


@pytest.mark.parametrize("where", [3, 4])  # target, name
def test_over_long_names_are_bad_requests(where: int) -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            items: list[Any] = [1, wire.CALL, 77, "probe", "echo", 1000, None, None]
            items[where] = "n" * (4 << 10)
            server._on_message([A, wire.pack(items), wire.pack([["x"], {}])])
            [(header, body)] = answers(pump, A)
            assert (header.id, body["code"]) == (77, "bad_request")

    asyncio.run(main())


@pytest.mark.parametrize("where", [0, 1])  # version, kind
def test_thousand_deep_version_or_kind_is_answered_with_the_id(where: int) -> None:
    async def main() -> None:
        deep: Any = 1
        for _ in range(999):
            deep = [deep]
        items: list[Any] = [1, wire.CALL, 78, "probe", "echo", 1000, None, None]
        items[where] = deep
        with probe_server() as (server, _probe, pump):
            server._on_message([A, wire.pack(items), wire.pack([["x"], {}])])
            [(header, body)] = answers(pump, A)
            assert header.kind == wire.ERROR and header.id == 78
            assert body["code"] in ("bad_request", "unsupported_version")

    asyncio.run(main())


def test_handler_error_message_is_clipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            for i in range(20):
                server._on_message([A, *call(i, "fail", "e" * (1 << 20))])
            await settle(server)
            replies = answers(pump, A)
            assert _codes(replies) == ["handler_error"] * 20
            assert all(len(body["message"]) <= wire.MAX_ERROR_MESSAGE + 32 for _, body in replies)

    with caplog.at_level(logging.ERROR, logger="meshkit.server"):
        asyncio.run(main())
    assert len(caplog.records) == 1 and len(caplog.records[0].getMessage()) < wire.MAX_ERROR_MESSAGE + 200


def test_answers_sent_to_a_server_are_counted_drops() -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            server._on_message([A, *wire.encode_reply(5, "stray")])
            server._on_message([])
            assert pump.sent == [] and server.dropped == 2

    asyncio.run(main())
