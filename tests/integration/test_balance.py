"""Instance choice: calls spread over every instance, and fewer go to a slow one."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest

from meshkit import AsyncClient, Settings

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
WORKER = "tests.integration.services.worker:Worker"


# Deadlines only: the calls are counted, not the seconds they take, so a
# slow machine makes these tests slower, never wrong.
_DEADLINE = 120.0


async def spread(settings: Settings, service: str, method: str, args: list[object], tasks: int,
                 enough: Callable[[Counter[str]], bool]) -> Counter[str]:
    """Run ``tasks`` concurrent callers until ``enough(counts)``; count results (instance ids)."""
    counts: Counter[str] = Counter()
    async with AsyncClient(settings) as client:
        deadline = time.monotonic() + _DEADLINE

        async def caller() -> None:
            while not enough(counts):
                assert time.monotonic() < deadline, f"too few calls within {_DEADLINE} s: {counts}"
                counts[await client.call(service, method, args)] += 1

        await asyncio.gather(*(caller() for _ in range(tasks)))
    return counts


def test_calls_spread_over_every_instance(start_service, mesh_settings: Settings) -> None:
    procs = start_service(ECHO, count=3)
    ids = {p.record.instance_id for p in procs}
    counts = asyncio.run(spread(mesh_settings, "echo", "sleep", [0.01], tasks=12,
                                enough=lambda c: sum(c.values()) >= 600))
    total = sum(counts.values())
    assert set(counts) == ids
    for instance, n in counts.items():
        assert n > total * 0.2, f"{instance} got {n} of {total}: {counts}"


def test_slow_instance_gets_fewer_calls(start_service, mesh_settings: Settings) -> None:
    fast = start_service(WORKER, count=2, env={"WORKER_DELAY": "0.01"})
    [slow] = start_service(WORKER, env={"WORKER_DELAY": "0.2"})
    fast_ids = [p.record.instance_id for p in fast]
    # Until each fast instance has served 150 calls, however long that takes.
    counts = asyncio.run(spread(mesh_settings, "worker", "work", [], tasks=8,
                                enough=lambda c: min(c[i] for i in fast_ids) >= 150))
    slow_n = counts[slow.record.instance_id]
    fast_n = [counts[i] for i in fast_ids]
    # Blind round robin would send a third of the calls to each (and stall
    # on the slow one); load-aware choice sends the slow one a trickle.
    assert slow_n < 0.25 * min(fast_n), counts
    print(f"calls per instance: fast {fast_n}, slow {slow_n}")
