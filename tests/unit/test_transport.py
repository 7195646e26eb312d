"""SocketPump: messages whole and in order, sends that would block refused, a raising handler contained."""

from __future__ import annotations

import asyncio
import logging

import pytest
import zmq

from meshkit.transport import SocketPump


def test_failing_handler_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://pump")
    b.connect("inproc://pump")
    seen: list[list[bytes]] = []

    def handler(frames: list[bytes]) -> None:
        seen.append(frames)
        raise RecursionError("a peer found a way in")

    async def main() -> SocketPump:
        pump = SocketPump(a, handler)
        pump.start()
        for i in range(100):
            b.send(b"%d" % i)
        while len(seen) < 100:
            pump.drain()
            await asyncio.sleep(0)
        pump.stop()
        return pump

    try:
        with caplog.at_level(logging.ERROR, logger="meshkit.transport"):
            pump = asyncio.run(main())
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
    assert pump.dropped == 100
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


def _pair(name: str) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes], zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(f"inproc://{name}")
    b.connect(f"inproc://{name}")
    return ctx, a, b


def _close(ctx: zmq.Context[zmq.Socket[bytes]], *socks: zmq.Socket[bytes]) -> None:
    for sock in socks:
        sock.close(linger=0)
    ctx.term()


def test_messages_arrive_whole_and_in_order_in_both_directions() -> None:
    ctx, a, b = _pair("order")
    got_a: list[list[bytes]] = []
    got_b: list[list[bytes]] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_b(frames: list[bytes]) -> None:
            got_b.append(frames)
            pump_b.send([b"re", frames[1]])  # answer from inside the handler

        def on_a(frames: list[bytes]) -> None:
            got_a.append(frames)
            if len(got_a) == 600:
                done.set()

        pump_a, pump_b = SocketPump(a, on_a), SocketPump(b, on_b)
        pump_a.start()
        pump_b.start()
        for i in range(600):  # more than one read batch
            assert pump_a.send([b"req", b"%d" % i])
        await asyncio.wait_for(done.wait(), 10.0)
        pump_a.stop()
        pump_b.stop()

    try:
        asyncio.run(main())
    finally:
        _close(ctx, a, b)
    assert got_b == [[b"req", b"%d" % i] for i in range(600)]
    assert got_a == [[b"re", b"%d" % i] for i in range(600)]


def test_large_frames_go_through_whole() -> None:
    ctx, a, b = _pair("large")
    big = bytes(range(256)) * 8192  # 2 MiB: above the zero-copy threshold
    got: list[list[bytes]] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_b(frames: list[bytes]) -> None:
            got.append(frames)
            done.set()

        pump_b = SocketPump(b, on_b)
        pump_b.start()
        assert SocketPump(a, lambda frames: None).send([b"h", big])
        await asyncio.wait_for(done.wait(), 10.0)
        pump_b.stop()

    try:
        asyncio.run(main())
    finally:
        _close(ctx, a, b)
    assert got == [[b"h", big]]


def test_send_says_false_when_zeromq_would_block() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)  # connected to nothing: nowhere to queue a message
    try:
        assert SocketPump(dealer, lambda frames: None).send([b"x"]) is False
    finally:
        _close(ctx, dealer)


def test_a_stopped_pump_delivers_nothing_more() -> None:
    ctx, a, b = _pair("stopped")
    got: list[list[bytes]] = []

    async def main() -> None:
        pump = SocketPump(a, got.append)
        pump.start()
        pump.stop()
        b.send(b"late")
        pump.drain()
        for _ in range(5):
            await asyncio.sleep(0)

    try:
        asyncio.run(main())
    finally:
        _close(ctx, a, b)
    assert got == []


def test_send_soon_sends_a_turns_messages_together_and_in_order() -> None:
    ctx, a, b = _pair("soon")

    async def main() -> SocketPump:
        pump = SocketPump(a, lambda frames: None)
        pump.start()
        for i in range(5):
            pump.send_soon([b"m", b"%d" % i])
        with pytest.raises(zmq.Again):  # nothing left before the loop's turn ends
            b.recv(zmq.NOBLOCK)
        await asyncio.sleep(0)
        got = [b.recv_multipart() for _ in range(5)]
        assert got == [[b"m", b"%d" % i] for i in range(5)]
        pump.send_soon([b"late"])
        pump.flush()  # at once (what closing the server does)
        assert b.recv_multipart() == [b"late"]
        await asyncio.sleep(0)  # the scheduled flush finds nothing more to send
        with pytest.raises(zmq.Again):
            b.recv(zmq.NOBLOCK)
        pump.stop()
        return pump

    try:
        pump = asyncio.run(main())
    finally:
        _close(ctx, a, b)
    assert pump.unsent == 0


def test_send_soon_without_batch_sends_at_once_unless_others_wait() -> None:
    ctx, a, b = _pair("soon-now")

    async def main() -> None:
        pump = SocketPump(a, lambda frames: None)
        pump.start()
        pump.send_soon([b"alone"], batch=False)
        assert b.recv_multipart(zmq.NOBLOCK) == [b"alone"]  # nothing else was queued: sent at once
        pump.send_soon([b"first"])
        pump.send_soon([b"second"], batch=False)  # queued behind the first: order is kept
        with pytest.raises(zmq.Again):
            b.recv(zmq.NOBLOCK)
        await asyncio.sleep(0)
        assert [b.recv_multipart(), b.recv_multipart()] == [[b"first"], [b"second"]]
        pump.stop()

    try:
        asyncio.run(main())
    finally:
        _close(ctx, a, b)


def test_sends_alone_lose_no_arrival_in_a_sequential_exchange() -> None:
    # Each side answers with alone=True (an EVENTS check instead of a read pass): if that check
    # ever left an arrival unread, the exchange would stall and the wait below would time out.
    ctx, a, b = _pair("alone")
    rounds = 2000
    got: list[int] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_b(frames: list[bytes]) -> None:
            assert pump_b.send([b"re", frames[1]], alone=True)

        def on_a(frames: list[bytes]) -> None:
            got.append(int(frames[1]))
            if len(got) == rounds:
                done.set()
            else:
                assert pump_a.send([b"req", b"%d" % len(got)], alone=True)

        pump_a, pump_b = SocketPump(a, on_a), SocketPump(b, on_b)
        pump_a.start()
        pump_b.start()
        assert pump_a.send([b"req", b"0"], alone=True)
        await asyncio.wait_for(done.wait(), 10.0)
        pump_a.stop()
        pump_b.stop()

    try:
        asyncio.run(main())
    finally:
        _close(ctx, a, b)
    assert got == list(range(rounds))


def test_a_send_alone_schedules_a_read_pass_only_when_a_message_waits() -> None:
    ctx, a, b = _pair("alone-pass")
    got: list[list[bytes]] = []

    async def main() -> None:
        pump = SocketPump(a, got.append)
        pump.start()
        await asyncio.sleep(0)  # the start's own pass
        assert pump.send([b"one"], alone=True)
        assert not pump._scheduled  # nothing waits: no pass
        b.send(b"back")
        deadline = asyncio.get_running_loop().time() + 10.0
        while not a.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the message reached a's queue
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        assert pump.send([b"two"], alone=True)
        assert pump._scheduled  # a message waits: read in this turn's pass
        await asyncio.sleep(0)
        assert got == [[b"back"]]
        pump.stop()

    try:
        asyncio.run(main())
    finally:
        _close(ctx, a, b)
