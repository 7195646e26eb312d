"""The gateway's ordered push queue (``meshkit.gateway.fanout``) and its state sweep's death rule."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from meshkit.errors import OVERLOADED
from meshkit.gateway.fanout import Fanout, FanoutFullError
from meshkit.gateway.keeper import StateKeeper
from meshkit.testing import FakeClock
from meshkit.untrusted import LogThrottle

THROTTLE = LogThrottle(logging.getLogger("test.fanout"))


class Conn:
    """Records every line written to it; subscribed to every topic."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def push(self, topic: str, line: bytes) -> bool:
        self.lines.append(line)
        return True

    def send(self, line: bytes) -> bool:
        self.lines.append(line)
        return True


async def _drained(fanout: Fanout) -> None:
    runner = asyncio.create_task(fanout.run())
    try:
        await asyncio.wait_for(fanout.wait_idle(), 5)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_topic_pushes_and_deliveries_reach_each_connection_in_the_order_accepted() -> None:
    conns = [Conn() for _ in range(1000)]
    fanout = Fanout(lambda: conns, THROTTLE, slice_size=100)
    fanout.accept(b"p1", topic="t")
    fanout.accept(b"d1", target=conns[999])
    fanout.accept(b"p2", topic="t")
    fanout.accept(b"d2", target=conns[0])
    assert all(not c.lines for c in conns)  # accepted (acknowledged) before any write
    asyncio.run(_drained(fanout))
    assert conns[999].lines == [b"p1", b"d1", b"p2"]
    assert conns[0].lines == [b"p1", b"p2", b"d2"]
    assert all(c.lines == [b"p1", b"p2"] for c in conns[1:999])
    assert fanout.queued_bytes == 0


def test_a_fan_out_yields_to_the_loop_between_slices() -> None:
    conns = [Conn() for _ in range(1000)]
    fanout = Fanout(lambda: conns, THROTTLE, slice_size=256)
    seen: list[int] = []

    async def main() -> None:
        fanout.accept(b"p", topic="t")
        runner = asyncio.create_task(fanout.run())

        async def ping() -> None:  # stands for mesh.ping, scheduled while the fan-out runs
            await asyncio.sleep(0)
            seen.append(sum(1 for c in conns if c.lines))

        await asyncio.gather(ping(), asyncio.wait_for(fanout.wait_idle(), 5))
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(main())
    assert seen and 0 < seen[0] < 1000, seen  # answered mid-fan-out, not after it
    assert all(c.lines == [b"p"] for c in conns)


def test_the_queue_is_bounded_in_bytes_and_a_full_queue_is_overloaded() -> None:
    fanout = Fanout(lambda: [], THROTTLE, max_bytes=100)
    fanout.accept(b"x" * 150, topic="t")  # one big push into an empty queue is let in
    with pytest.raises(FanoutFullError) as caught:
        fanout.accept(b"y", topic="t")
    assert caught.value.code == OVERLOADED
    asyncio.run(_drained(fanout))
    fanout.accept(b"x" * 60, topic="t")
    with pytest.raises(FanoutFullError):
        fanout.accept(b"x" * 60, target=Conn())
    fanout.accept(b"x" * 40, target=Conn())
    assert fanout.queued_bytes == 100
    with pytest.raises(ValueError):
        fanout.accept(b"z")
    with pytest.raises(ValueError):
        Fanout(lambda: [], THROTTLE, max_bytes=0)


class Store:
    """The part of ConnectionStore the sweep uses, in memory."""

    def __init__(self, gateways: set[str]) -> None:
        self.gateways_with_state = set(gateways)
        self.dropped: list[str] = []

    async def gateways(self) -> set[str]:
        return set(self.gateways_with_state)

    async def drop_gateway(self, gateway_id: str) -> int:
        self.dropped.append(gateway_id)
        self.gateways_with_state.discard(gateway_id)
        return 7

    async def reconcile(self, instance_id: str, connections: Any) -> int:
        return 0

    async def restore(self, instance_id: str, peers: Any) -> list[str]:
        return []


def test_a_gateway_is_swept_only_after_being_missing_for_dead_after_seconds() -> None:
    clock = FakeClock()
    store = Store({"me", "late", "dead"})
    live = {"me", "late", "dead"}

    async def live_gateways() -> set[str]:
        return set(live)

    keeper = StateKeeper(store, "me", THROTTLE, live_gateways,  # type: ignore[arg-type]
                         dead_after=15.0, clock=clock)

    async def main() -> None:
        await keeper.sweep({})
        live.difference_update({"late", "dead"})
        for _ in range(3):  # missing on sweeps at 0, 5 and 10 s: not yet dead
            assert await keeper.sweep({}) == 0
            clock.advance(5)
        live.add("late")  # its heartbeat made it after all
        assert await keeper.sweep({}) == 7  # "dead" has been missing 15 s
        assert store.dropped == ["dead"]
        live.discard("late")  # missing again: the clock starts over
        clock.advance(10)
        assert await keeper.sweep({}) == 0
        clock.advance(15)
        assert await keeper.sweep({}) == 7
        assert store.dropped == ["dead", "late"]

    asyncio.run(main())
    with pytest.raises(ValueError):
        StateKeeper(store, "me", THROTTLE, live_gateways, dead_after=0)  # type: ignore[arg-type]


def test_a_gateway_whose_own_record_lapsed_says_so_and_keeps_its_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = Store({"me"})
    live: set[str] = set()

    async def live_gateways() -> set[str]:
        return set(live)

    keeper = StateKeeper(store, "me", THROTTLE, live_gateways,  # type: ignore[arg-type]
                         dead_after=1.0, clock=clock)

    async def main() -> None:
        await keeper.sweep({})  # before its first heartbeat: nothing to say
        live.add("me")
        await keeper.sweep({})
        live.clear()
        with caplog.at_level(logging.INFO, logger="meshkit.gateway"):
            for _ in range(3):
                clock.advance(5)
                await keeper.sweep({})
            live.add("me")
            await keeper.sweep({})

    asyncio.run(main())
    assert store.dropped == []
    lapsed = [r for r in caplog.records if "had lapsed" in r.getMessage()]
    assert len(lapsed) == 1 and lapsed[0].levelno == logging.WARNING
    assert any("is back" in r.getMessage() for r in caplog.records)
