"""Streamed calls: the ITEM and CREDIT bytes, the credit arithmetic, and a streaming handler in-process.

The wire bytes are pinned as golden vectors (``docs/protocol.md`` §12); the
server runs in-process behind its real router (:class:`ServiceHarness`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

import meshkit
from meshkit import wire
from meshkit.errors import BadRequestError, CallTimeoutError, ProtocolError
from meshkit.gateway.options import GatewayOptions
from meshkit.gateway.session import Session
from meshkit.metrics import Metrics
from meshkit.record import InstanceRecord
from meshkit.streams import MAX_WINDOW, STREAM_META, Credit, Window, decode_credit, encode_credit, encode_item
from meshkit.testing import ServiceHarness

_WAIT = 5.0


# -- the wire ------------------------------------------------------------------


def test_item_and_credit_golden_vectors() -> None:
    assert [f.hex() for f in encode_item(1, 42)] == ["93010901", "2a"]
    assert [f.hex() for f in encode_item(2**64 - 1, "ab")] == ["930109cfffffffffffffffff", "a26162"]
    assert [f.hex() for f in encode_credit(1, 8)] == ["93010a01", "08"]
    assert [f.hex() for f in encode_credit(3, 1024)] == ["93010a03", "cd0400"]


def test_item_and_credit_headers_have_three_items_and_a_client_is_never_sent_a_credit() -> None:
    assert wire.decode_header(bytes.fromhex("93010901")).kind == wire.ITEM
    assert wire.decode_header(bytes.fromhex("93010a01")).kind == wire.CREDIT
    with pytest.raises(ProtocolError, match="3 items"):
        wire.decode_header(wire.pack([1, wire.CREDIT, 1, "x"]))
    assert wire.decode_answer(encode_item(5, [1, 2])).value == [1, 2]
    with pytest.raises(ProtocolError, match="not sent a CREDIT"):
        wire.decode_answer(encode_credit(5, 2))


def test_a_credit_is_an_integer_from_one_to_the_largest_window() -> None:
    assert decode_credit(wire.pack(1)) == 1
    assert decode_credit(wire.pack(MAX_WINDOW)) == MAX_WINDOW
    for bad in (0, -1, MAX_WINDOW + 1, "3", None, 2**40):
        with pytest.raises(ProtocolError):
            decode_credit(wire.pack(bad))


def test_the_record_says_an_instance_streams() -> None:
    record = InstanceRecord("s", "i", "tcp://h:1", "h", 1, features=wire.FEATURES)
    assert InstanceRecord.from_json(record.to_json()).features == ("cancel", "stream", "batch")


# -- the credit arithmetic -------------------------------------------------------


def test_the_callers_window_grants_back_in_half_window_batches_and_never_lets_more_in() -> None:
    window = Window(4)
    assert all(window.received() for _ in range(4))
    assert not window.received()  # a fifth, ungranted: the instance broke the protocol
    assert window.consumed() == 0
    assert window.consumed() == 2  # half the window consumed: granted back
    assert window.outstanding == 2
    assert window.received() and window.received() and not window.received()
    assert [window.consumed() for _ in range(4)] == [0, 2, 0, 2]
    assert window.outstanding == 4


def test_a_window_of_one_grants_each_item_back() -> None:
    window = Window(1)
    assert window.received() and not window.received()
    assert window.consumed() == 1 and window.received()
    with pytest.raises(ValueError):
        Window(0)
    with pytest.raises(ValueError):
        Window(MAX_WINDOW + 1)


def test_the_instances_credit_waits_at_zero_and_is_capped() -> None:
    async def main() -> None:
        credit = Credit(2)
        await credit.take()
        await credit.take()
        waiting = asyncio.ensure_future(credit.take())
        await asyncio.sleep(0)
        assert not waiting.done()  # no credit left: the producer waits
        credit.grant(1)
        await asyncio.wait_for(waiting, _WAIT)
        assert credit.available == 0
        credit.grant(MAX_WINDOW)
        credit.grant(MAX_WINDOW)
        assert credit.available == MAX_WINDOW
    asyncio.run(main())


# -- the server, in-process ------------------------------------------------------


class Counter(meshkit.Service):
    name = "counter"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.produced = 0
        self.closed = asyncio.Event()
        self.meta_seen: dict[str, str] = {}

    @meshkit.rpc
    async def count(self, n: int) -> AsyncIterator[int]:
        ctx = meshkit.current_call()
        self.meta_seen = dict(ctx.meta) if ctx is not None else {}
        try:
            for i in range(n):
                self.produced += 1
                yield i
        finally:
            self.closed.set()

    @meshkit.rpc
    async def fail_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ValueError("no more")

    @meshkit.rpc
    async def plain(self) -> int:
        return 1


def test_items_arrive_in_order_then_the_stream_ends() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            got = [x async for x in h.client.stream("counter", "count", 50, window=4)]
            assert got == list(range(50))
            assert STREAM_META not in h.service.meta_seen  # the mark is not passed on to nested calls
            assert [x async for x in h.client.stream("counter", "count", 0)] == []
    asyncio.run(main())


def test_a_handlers_error_ends_the_stream_after_its_items() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            got: list[int] = []
            with pytest.raises(meshkit.RemoteError, match="no more"):
                async for x in h.client.stream("counter", "fail_after", 3):
                    got.append(x)
            assert got == [0, 1, 2]
    asyncio.run(main())


def test_a_stream_method_called_plainly_and_a_plain_method_streamed_are_bad_requests() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            with pytest.raises(BadRequestError, match="call it with stream"):
                await h.call("count", 3)
            with pytest.raises(BadRequestError, match="does not stream"):
                [x async for x in h.client.stream("counter", "plain")]
            with pytest.raises(BadRequestError, match="window"):
                await h.call("count", 3, meta={STREAM_META: "0"})
    asyncio.run(main())


def test_a_consumer_that_stops_reading_stops_the_producer_within_its_window() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            stream = h.client.stream("counter", "count", 1000, window=8)
            assert await stream.__anext__() == 0
            server = h.service._server
            assert server is not None
            # Positive signal: the instance has sent all the credit allows (8), and holds no more.
            for _ in range(500):
                if server.streams.items_sent >= 8:
                    break
                await asyncio.sleep(0.002)
            assert server.streams.items_sent == 8
            await asyncio.sleep(0.05)  # the producer, had it not stopped, would have run on by now
            assert h.service.produced == 8 and server.streams.items_sent == 8
            rest = [await stream.__anext__() for _ in range(20)]
            assert rest == list(range(1, 21))
            await stream.aclose()
            await asyncio.wait_for(h.service.closed.wait(), _WAIT)
            assert h.service.produced <= 21 + 8
    asyncio.run(main())


def test_breaking_out_of_the_loop_closes_the_generator() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            async for x in h.client.stream("counter", "count", 10**6, window=4):
                if x == 5:
                    break
            await asyncio.wait_for(h.service.closed.wait(), _WAIT)  # its finally ran
            assert h.service.produced < 20
    asyncio.run(main())


def test_the_callers_deadline_ends_the_stream_with_a_timeout() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            stream = h.client.stream("counter", "count", 10**6, timeout=0.2, window=2)
            assert await stream.__anext__() == 0
            await asyncio.sleep(0.3)  # the consumer stalls past the deadline (the time-out under test)
            with pytest.raises(CallTimeoutError):
                while True:
                    await stream.__anext__()
            await asyncio.wait_for(h.service.closed.wait(), _WAIT)
    asyncio.run(main())


# -- the gateway's relay ---------------------------------------------------------


class _Lines(Session):
    """A session that keeps the lines it sends (and can be closed)."""

    def __init__(self, stateful: bool = True) -> None:
        async def call(session: Session, request: Any) -> Any:
            raise AssertionError("not called")
        super().__init__("c1", options=GatewayOptions(), call=call, metrics=Metrics("", "", ""))
        self.stateful = stateful
        self.lines: list[dict[str, Any]] = []
        self.open = True

    def send(self, line: bytes) -> bool:
        if not self.open:
            return False
        self.lines.append(json.loads(line))
        return True


def test_the_gateway_relays_items_as_notifications_tied_to_the_request_then_answers_null() -> None:
    async def items() -> AsyncIterator[Any]:
        for x in (1, "two", {"three": 3}):
            yield x

    async def main() -> None:
        session = _Lines()
        assert await session.relay_stream(7, items()) is None
        assert session.lines == [{"jsonrpc": "2.0", "method": "mesh.stream", "params": {"id": 7, "item": item}}
                                 for item in (1, "two", {"three": 3})]
        one_request = _Lines(stateful=False)  # HTTP: nothing can go out before the answer
        assert await one_request.relay_stream("r", items()) == [1, "two", {"three": 3}]
        assert one_request.lines == []
    asyncio.run(main())


def test_the_gateway_stops_reading_a_stream_when_its_client_is_gone() -> None:
    pulled = 0

    async def items() -> AsyncIterator[int]:
        nonlocal pulled
        for x in range(100):
            pulled += 1
            yield x

    async def main() -> None:
        session = _Lines()
        session.open = False
        assert await session.relay_stream(1, items()) is None
        assert pulled == 1 and session.lines == []
    asyncio.run(main())


def test_a_record_lists_the_methods_that_stream() -> None:
    record = InstanceRecord("s", "i", "tcp://h:1", "h", 1, features=wire.FEATURES, streams=("count",))
    assert InstanceRecord.from_json(record.to_json()).streams == ("count",)
    assert "streams" not in InstanceRecord("s", "i", "tcp://h:1", "h", 1).to_json()  # absent when none
    with pytest.raises(ValueError, match="streams"):
        InstanceRecord.from_dict({**json.loads(record.to_json()), "streams": "count"})


def test_a_proxys_method_streams_and_still_calls() -> None:
    async def main() -> None:
        async with ServiceHarness(Counter) as h:
            counter = h.client.service("counter", timeout=5)
            assert [x async for x in counter.count.stream(4)] == [0, 1, 2, 3]
            assert await counter.plain() == 1
            assert counter.plain.__name__ == "plain"
    asyncio.run(main())
