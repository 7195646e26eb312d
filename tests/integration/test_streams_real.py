"""Streamed calls between real processes: order, flow control, cancellation, deadlines.

``services/streamer.py`` logs every item it makes and when its generator
closed; the tests read that log (polling with a deadline) to see what the
producer did.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkit import AsyncClient, CallTimeoutError, Client, Settings
from meshkit.testing import ServiceProcess

pytestmark = pytest.mark.integration

StartService = Callable[..., list[ServiceProcess]]
STREAMER = "tests.integration.services.streamer:Streamer"
LIMIT = 0.050  # seconds from breaking out of the loop to the generator's finally
_WAIT = 10.0


@pytest.fixture
def stream_log(tmp_path: Path, start_service: StartService) -> Path:
    log = tmp_path / "stream.log"
    start_service(STREAMER, env={"STREAM_LOG": str(log)})
    return log


def events(log: Path, tag: str) -> list[tuple[str, int, float]]:
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        t, event, n, at = line.split()
        if t == tag:
            found.append((event, int(n), float(at)))
    return found


async def until(log: Path, tag: str, event: str) -> list[tuple[str, int, float]]:
    """Wait (polling the file, with a deadline) until ``event`` of ``tag`` is recorded."""
    deadline = time.monotonic() + _WAIT
    while True:
        seen = events(log, tag)
        if any(e == event for e, _, _ in seen):
            return seen
        assert time.monotonic() < deadline, f"no {event} among {seen[-5:]}"
        await asyncio.sleep(0.002)


async def ready_client(settings: Settings) -> AsyncClient:
    client = AsyncClient(settings)
    await client.start()
    return client


def test_items_arrive_in_order_across_processes(stream_log: Path, mesh_settings: Settings) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        try:
            tag = uuid.uuid4().hex[:8]
            got = [x async for x in client.stream("streamer", "count", tag, 500, window=8, timeout=10)]
            assert got == list(range(500))
            await until(stream_log, tag, "closed")
        finally:
            await client.close()
    asyncio.run(main())


def test_the_blocking_client_iterates_a_stream(stream_log: Path, mesh_settings: Settings) -> None:
    with Client(mesh_settings) as client:
        tag = uuid.uuid4().hex[:8]
        assert list(client.stream("streamer", "count", tag, 40, window=4, timeout=10)) == list(range(40))
        assert list(client.service("streamer", timeout=10).count.stream(tag + "p", 5)) == list(range(5))
        for x in client.stream("streamer", "count", tag + "b", 10**6, window=4, timeout=10):
            if x == 3:
                break

        async def closed() -> None:
            await until(stream_log, tag + "b", "closed")
        asyncio.run(closed())


def test_a_slow_consumer_stops_the_producer_within_the_window(stream_log: Path, mesh_settings: Settings) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        try:
            tag = uuid.uuid4().hex[:8]
            window = 8
            stream = client.stream("streamer", "count", tag, 10**6, window=window, timeout=20)
            assert await stream.__anext__() == 0
            # Positive signal: the instance has used all its credit (window items here, none outstanding).
            deadline = time.monotonic() + _WAIT
            while stream._buffer.window.outstanding or len(stream._buffer.items) < window - 1:
                assert time.monotonic() < deadline, "the window was never filled"
                await asyncio.sleep(0.002)
            made = len([e for e in events(stream_log, tag) if e[0] == "made"])
            assert made == window
            await asyncio.sleep(0.5)  # the consumer is slow: half a second without reading
            made_while_stalled = len([e for e in events(stream_log, tag) if e[0] == "made"])
            print("made while the consumer stalled:", made_while_stalled, "window:", window)
            assert made_while_stalled == window  # the producer stopped at the window
            got = [await stream.__anext__() for _ in range(100)]
            assert got == list(range(1, 101))  # reading again resumes it, in order
            await stream.aclose()
            await until(stream_log, tag, "closed")
        finally:
            await client.close()
    asyncio.run(main())


def test_breaking_out_of_the_loop_closes_the_producer_within_50_ms(
    stream_log: Path, mesh_settings: Settings
) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        try:
            delays = []
            for _ in range(5):
                tag = uuid.uuid4().hex[:8]
                gave_up = 0.0
                async for x in client.stream("streamer", "count", tag, 10**6, window=16, timeout=10):
                    if x == 20:
                        gave_up = time.monotonic()
                        break
                seen = await until(stream_log, tag, "closed")
                delays.append(next(at for e, _, at in seen if e == "closed") - gave_up)
            print("generator closed after (ms):", [round(d * 1000, 2) for d in delays])
            assert all(d <= LIMIT for d in delays), delays
        finally:
            await client.close()
    asyncio.run(main())


def test_the_deadline_ends_the_stream_with_a_timeout(stream_log: Path, mesh_settings: Settings) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        try:
            tag = uuid.uuid4().hex[:8]
            got: list[int] = []
            began = time.monotonic()
            with pytest.raises(CallTimeoutError):
                async for x in client.stream("streamer", "count", tag, 10**6, 0.02, timeout=0.5):
                    got.append(x)
            took = time.monotonic() - began
            assert got == list(range(len(got))) and len(got) >= 3
            assert 0.45 <= took < 2.0, took
            await until(stream_log, tag, "closed")
        finally:
            await client.close()
    asyncio.run(main())
