"""The loop turns of a TCP connection's requests, and its writes (no network, no sleeps).

A lone request's call starts in the turn that read it, and a lone answer
goes out within the step that produced it (each a loop turn of latency saved
for a client with one request in flight); requests beside others in flight,
or in a chunk of several lines, start together at the next turn, and answers that finish in one turn while
others are in flight, and the answers to one chunk of lines, go out in one
write.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from test_fuzz_jsonrpc import FakeTransport

from meshkit.gateway import GatewayOptions
from meshkit.gateway.connection import Connection
from meshkit.gateway.jsonrpc import Request
from meshkit.metrics import Metrics


class RecordingTransport(FakeTransport):
    """The fuzz tests' fake transport, also noting each write and the task it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[bytes, asyncio.Task[Any] | None]] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append((bytes(data), asyncio.current_task()))


def connect(gate: asyncio.Future[None] | None = None,
            started: list[Any] | None = None) -> tuple[Connection, RecordingTransport]:
    """A connection whose mesh calls echo their params, each once ``gate`` (if any) is done.

    Each call's id goes into ``started`` (if given) as the call starts.
    """

    async def call(conn: Connection, request: Request) -> Any:
        if started is not None:
            started.append(request.id)
        if gate is not None:
            await gate
        return request.params

    transport = RecordingTransport()
    conn = Connection("gw-1", options=GatewayOptions(max_inflight=8), call=call,
                      metrics=Metrics("", "", "gateway"), peer="127.0.0.1:1")
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def line(rid: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "svc.m", "params": [rid]}).encode() + b"\n"


def ids(data: bytes) -> list[int]:
    return [json.loads(text)["id"] for text in data.splitlines()]


async def settle(conn: Connection) -> None:
    """Return once no request is running and nothing waits to be written (bounded)."""
    for _ in range(100):
        if not conn._tasks and not conn._pending:
            return
        await asyncio.sleep(0)
    raise AssertionError("requests still running")


def test_a_lone_answer_is_written_by_the_request_that_produced_it() -> None:
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()
        conn, transport = connect(gate)
        conn.data_received(line(1))
        (task,) = conn._tasks  # started at once, now waiting for its mesh call
        gate.set_result(None)
        await settle(conn)
        assert len(transport.writes) == 1
        data, writer = transport.writes[0]
        assert ids(data) == [1]
        assert writer is task, "the answer waited for a later turn of the loop"

    asyncio.run(main())


def test_a_lone_request_is_sent_on_in_the_turn_that_read_it_others_at_the_next_turn() -> None:
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()
        started: list[Any] = []
        conn, transport = connect(gate, started)
        conn.data_received(line(1))
        assert started == [1], "a lone call waited for a later turn of the loop"
        conn.data_received(line(2))  # beside one in flight
        conn.data_received(line(3) + line(4))  # a chunk of lines: together, even the first
        assert started == [1]
        await asyncio.sleep(0)
        assert started == [1, 2, 3, 4]
        gate.set_result(None)
        await settle(conn)
        assert sorted(i for data, _ in transport.writes for i in ids(data)) == [1, 2, 3, 4]

    asyncio.run(main())


def test_answers_finishing_in_one_turn_go_out_in_one_write() -> None:
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()
        conn, transport = connect(gate)
        conn.data_received(line(1))
        conn.data_received(line(2))  # two reads: two requests in flight
        await asyncio.sleep(0)
        gate.set_result(None)  # both mesh calls return in the same turn
        await settle(conn)
        assert [ids(data) for data, _ in transport.writes] == [[1, 2]]

    asyncio.run(main())


def test_the_answers_to_one_chunk_of_lines_go_out_in_one_write() -> None:
    async def main() -> None:
        conn, transport = connect()
        ping = b'{"jsonrpc": "2.0", "id": 9, "method": "mesh.ping"}\n'
        conn.data_received(b"nonsense\n" + ping + b"[]\n")  # answered without a mesh call
        assert len(transport.writes) == 1, "written as the chunk was handled"
        assert [json.loads(t).get("id") for t in transport.writes[0][0].splitlines()] == [None, 9, None]
        await settle(conn)
        assert len(transport.writes) == 1

    asyncio.run(main())


def test_a_finished_request_costs_no_callback_on_the_loop_to_be_forgotten() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        scheduled: list[Any] = []
        call_soon = loop.call_soon

        def counting_call_soon(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
            scheduled.append(callback)
            return call_soon(callback, *args, **kwargs)

        loop.call_soon = counting_call_soon  # type: ignore[method-assign]
        gate = loop.create_future()
        conn, transport = connect(gate)
        conn.data_received(line(1))
        gate.set_result(None)
        await settle(conn)
        assert ids(transport.writes[0][0]) == [1]
        assert not [c for c in scheduled if getattr(c, "__self__", None) is conn._tasks]

    asyncio.run(main())


def test_a_chunks_answers_join_those_already_due_at_the_next_turn() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        gates = {1: loop.create_future(), 2: loop.create_future()}

        async def call(conn: Connection, request: Request) -> Any:
            await gates[request.id]
            return request.params

        transport = RecordingTransport()
        conn = Connection("gw-1", options=GatewayOptions(max_inflight=8), call=call,
                          metrics=Metrics("", "", "gateway"), peer="127.0.0.1:1")
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(line(1))
        conn.data_received(line(2))
        await asyncio.sleep(0)
        gates[1].set_result(None)
        await asyncio.sleep(0)  # answer 1 given (2 still in flight): due at the next turn
        assert conn._pending and not transport.writes
        conn.data_received(b'{"jsonrpc": "2.0", "id": 9, "method": "mesh.ping"}\n')
        assert not transport.writes, "the chunk's answer was written apart from the one due"
        await asyncio.sleep(0)
        assert [ids(data) for data, _ in transport.writes] == [[1, 9]]
        gates[2].set_result(None)
        await settle(conn)
        assert [ids(data) for data, _ in transport.writes] == [[1, 9], [2]]

    asyncio.run(main())
