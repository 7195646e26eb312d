"""Push-publish: every subscribed instance of every service gets it, in order, and a
dead subscriber cannot hold the publisher up."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from rawpeer import RawPeer

from meshkit import AsyncClient, Client, Settings
from meshkit.testing import ServiceProcess

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
LISTENER = "tests.integration.services.listener:Listener"
TOPIC = "echo.events"


def received(zmq_ctx: Any, proc: ServiceProcess) -> list[Any]:
    """What one instance recorded, asked of that very instance."""
    assert proc.record is not None
    with RawPeer(zmq_ctx, proc.record.endpoint) as raw:
        result = raw.call(proc.record.service, "events")
    return result if proc.record.service == "echo" else result["events"]


def test_publish_reaches_every_subscriber(start_service, mesh_client: Client, zmq_ctx) -> None:
    procs = start_service(ECHO, count=2) + start_service(LISTENER, count=2)
    assert mesh_client.publish(TOPIC, {"n": 1}) == 4
    assert mesh_client.publish(TOPIC, [b"\x00", None]) == 4
    assert mesh_client.publish("nobody.listens", 1) == 0
    for proc in procs:
        assert received(zmq_ctx, proc) == [{"n": 1}, [b"\x00", None]]


def test_order_is_kept_per_publisher_and_subscriber(start_service, mesh_settings: Settings,
                                                    zmq_ctx) -> None:
    procs = start_service(ECHO, count=2) + start_service(LISTENER, count=2)
    n = 200

    async def publish_all(tag: str, client: AsyncClient) -> list[int]:
        # All sent at once, without waiting for acknowledgements in between.
        return await asyncio.gather(*(client.publish(TOPIC, [tag, i], timeout=10) for i in range(n)))

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncClient(mesh_settings) as a, AsyncClient(mesh_settings) as b:
            return tuple(await asyncio.gather(publish_all("a", a), publish_all("b", b)))  # type: ignore[return-value]

    acked_a, acked_b = asyncio.run(main())
    assert acked_a == [4] * n and acked_b == [4] * n
    for proc in procs:
        events = received(zmq_ctx, proc)
        assert len(events) == 2 * n
        for tag in ("a", "b"):
            assert [i for t, i in events if t == tag] == list(range(n)), f"{tag} out of order"


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_dead_subscriber_cannot_hold_the_publisher(start_service, mesh_client: Client,
                                                   zmq_ctx, how: str) -> None:
    [echo] = start_service(ECHO)
    dead, alive = start_service(LISTENER, count=2)
    assert mesh_client.publish(TOPIC, 0) == 3
    dead.process.send_signal(getattr(signal, how))
    took = []
    for i, timeout in enumerate((0.5, None, 0.3, None), 1):
        bound = mesh_client.settings.publish_timeout if timeout is None else timeout
        started = time.monotonic()
        delivered = mesh_client.publish(TOPIC, i, timeout=timeout)
        elapsed = time.monotonic() - started
        assert delivered == 2
        assert elapsed < bound + 0.25, f"publish {i} took {elapsed:.2f}s with timeout {bound}s"
        took.append(f"{elapsed:.2f}/{bound}")
    print(f"\n{how}: publish took (s/timeout) {took}")
    for proc in (echo, alive):
        assert received(zmq_ctx, proc) == [0, 1, 2, 3, 4]
