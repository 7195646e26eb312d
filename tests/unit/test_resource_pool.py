"""The resource pool's behaviour around Redis, with a scripted stand-in for Redis and the fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshkit.config import Settings
from meshkit.errors import ResourceExhaustedError
from meshkit.resources import RATE_SCRIPT, ResourcePool
from meshkit.testing import FakeClock


class ScriptedRedis:
    """Answers each ``eval`` with the next scripted reply (an exception is raised); counts calls."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        self.calls.append((script, keys_and_args))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def aclose(self) -> None:
        pass


def pool(redis: ScriptedRedis, clock: FakeClock, **limit: Any) -> ResourcePool:
    settings = Settings(resources={"api": limit}, namespace="t")
    return ResourcePool(settings, "me", lambda: redis, clock=clock)


async def turns() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_units_come_from_a_batch_without_a_round_trip_each() -> None:
    async def main() -> None:
        clock = FakeClock()
        # window 42 has 80 ms left; the first lease asks for 1, gets 1; the next for a batch
        redis = ScriptedRedis([[1, 42, 80, 1], [5, 43, 100, 6]])
        p = pool(redis, clock, rate=100, window=0.1, lease_fraction=0.5)
        await p.acquire({"api": 1}, None, wait=True)
        assert len(redis.calls) == 1 and redis.calls[0][0] == RATE_SCRIPT
        assert redis.calls[0][1] == ("t:res:api:rate", "100.0", 100, 1)
        clock.advance(0.1)  # the next window: this instance spent 1 in the last one
        for _ in range(5):
            await p.acquire({"api": 1}, None, wait=True)
        assert len(redis.calls) == 2 and redis.calls[1][1][-1] == 1  # asked for last window's spend: 1 ...
        assert p.resources["api"].use.used == 6

    asyncio.run(main())


def test_redis_down_means_no_units_and_says_so() -> None:
    async def main() -> None:
        clock = FakeClock()
        redis = ScriptedRedis([ConnectionError("refused")])
        p = pool(redis, clock, concurrency=3)
        with pytest.raises(ResourceExhaustedError, match=r"'api': its limit could not be checked"):
            await p.acquire({"api": 1}, None, wait=False)
        assert p.resources["api"].use.errors == 1

    asyncio.run(main())


def test_a_waiting_call_polls_once_per_interval_and_gives_up_before_its_deadline() -> None:
    async def main() -> None:
        clock = FakeClock()
        full = [0, 3, 0]  # held 0, total 3, share 0: the cluster is full
        redis = ScriptedRedis([list(full) for _ in range(20)])
        p = pool(redis, clock, concurrency=3)
        waiter = asyncio.ensure_future(p.acquire({"api": 1}, clock.now() + 0.12, wait=True))
        await turns()
        assert len(redis.calls) == 1 and not waiter.done()
        clock.advance(0.05)
        await turns()
        assert len(redis.calls) == 2  # one poll per SLOT_POLL, not a busy loop
        assert redis.calls[1][1][-1] == 1  # telling Redis its demand: the one call that waits
        clock.advance(0.05)
        await turns()
        with pytest.raises(ResourceExhaustedError, match="concurrency of 3"):
            await waiter
        assert p.resources["api"].slots is not None and p.resources["api"].slots.waiting == 0

    asyncio.run(main())


def test_slots_are_given_back_at_close() -> None:
    async def main() -> None:
        clock = FakeClock()
        redis = ScriptedRedis([[1, 1, 3], [0, 0, 3]])
        p = pool(redis, clock, concurrency=3)
        await p.acquire({"api": 1}, None, wait=True)
        p.release({"api": 1})
        await p.close()
        assert redis.calls[-1][1][5] == 0  # target holding 0
        assert p.resources["api"].slots is not None and p.resources["api"].slots.leased == 0

    asyncio.run(main())


class GatedRedis(ScriptedRedis):
    """A ScriptedRedis whose answers wait until ``gate`` is set (a slow round trip)."""

    def __init__(self, replies: list[Any]) -> None:
        super().__init__(replies)
        self.gate = asyncio.Event()

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        self.calls.append((script, keys_and_args))
        await self.gate.wait()
        return self.replies.pop(0)


def test_slots_being_given_back_are_not_used_while_redis_hears_of_it() -> None:
    async def main() -> None:
        clock = FakeClock()
        redis = GatedRedis([[5, 5, 10], [3, 3, 10]])
        p = pool(redis, clock, concurrency=10, lease_fraction=0.1)  # batches of 1
        res = p.resources["api"]
        assert res.slots is not None
        first = asyncio.ensure_future(p.acquire({"api": 5}, None, wait=True))
        await turns()
        redis.gate.set()
        await first
        redis.gate.clear()
        p.release({"api": 3})  # 3 idle > 2 batches: 2 go back (keep one spare), sent in the background
        await turns()
        assert len(redis.calls) == 2 and redis.calls[1][1][5] == 3  # target: 2 in use + 1 spare
        assert res.slots.leased == 3  # shrunk before Redis answered
        assert res.slots.take(1, clock.now()) and not res.slots.take(1, clock.now())
        redis.gate.set()
        await turns()
        assert (res.slots.leased, res.slots.in_use) == (3, 3)
        await p.close()

    asyncio.run(main())
