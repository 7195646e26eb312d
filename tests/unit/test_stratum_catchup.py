"""A mining instance that missed a job while it started fetches it before judging a share for it.

A job the announcer pushes between a new instance's load of ``recent`` and
the announcer's view of that instance never reaches it; miners then submit
shares for it there, which the restart proof saw refused as stale (``[21]``)
for a whole job interval. The instance asks the announcer again, once for
every share waiting on it and at most every ``CATCH_UP_EVERY`` seconds, and
only for a job id newer than any it knows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import zmq

from meshkit.testing import test_settings
from services import mining
from services.stratum import session
from services.stratum.work import BlockTemplate, make_job, next_template

BASE = BlockTemplate(height=0, prevhash=b"\x11" * 32, version=0x20000000, nbits=0x1D00FFFF, ntime=0,
                     coinbase_value=50 * 10**8, payout_script=b"\x51")
TEMPLATE = next_template(BASE, 1700000000)


Parts = tuple[zmq.Context[zmq.Socket[bytes]], ThreadPoolExecutor]


@pytest.fixture
def parts() -> Iterator[Parts]:
    """What a Service would make for itself, owned (and closed) by the test."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    executor = ThreadPoolExecutor(1)
    yield ctx, executor
    executor.shutdown()
    ctx.term()


def pool_with_announcer(parts: Parts, jobs: list[str]) -> tuple[mining.Mining, list[str]]:
    ctx, executor = parts
    pool = mining.Mining(test_settings("redis://127.0.0.1:1/0"), zmq_context=ctx, executor=executor)
    asked: list[str] = []

    async def call(service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(f"{service}.{method}")
        await asyncio.sleep(0)  # a real round trip yields, so waiting shares pile up behind one call
        return [session.job_to_wire(make_job(TEMPLATE, j, extranonce_size=8)) for j in jobs]

    pool.call = call  # type: ignore[method-assign]  # the announcer, faked: a unit test
    pool.book.add(make_job(TEMPLATE, "10", extranonce_size=8))
    return pool, asked


def test_a_share_for_a_newer_unknown_job_waits_for_the_announcers_recent_jobs(parts: Parts) -> None:
    pool, asked = pool_with_announcer(parts, ["10", "11"])

    async def main() -> list[bool]:
        found = await asyncio.gather(*(pool.lookup_job("11") for _ in range(20)))
        return [f.job is not None and not f.stale for f in found]

    assert asyncio.run(main()) == [True] * 20
    assert asked == ["jobs.recent"]  # one call for all twenty shares


def test_an_older_or_garbage_job_id_never_calls_the_announcer(parts: Parts) -> None:
    pool, asked = pool_with_announcer(parts, ["10", "11"])

    async def main() -> None:
        assert (await pool.lookup_job("0f")).job is None
        assert (await pool.lookup_job("not hex")).job is None
        assert (await pool.lookup_job("10")).job is not None

    asyncio.run(main())
    assert asked == []


def test_catch_ups_are_spaced_so_a_miner_cannot_make_one_per_share(parts: Parts) -> None:
    pool, asked = pool_with_announcer(parts, ["10"])  # the announcer does not know the job either

    async def main() -> None:
        for _ in range(50):
            assert (await pool.lookup_job("ffff")).job is None

    asyncio.run(main())
    assert asked == ["jobs.recent"]
