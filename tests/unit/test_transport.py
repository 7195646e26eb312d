"""SocketPump: a handler that raises drops the message, counts it and logs once per cause."""

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
