"""Cancellation across processes: a three-hop chain (client → A → B → C, real processes) stops at every hop.

Each hop records when it saw its cancellation (``services/chain.py``); the
caller gives up in each of the four ways the issue lists — its task is
cancelled, ``asyncio.wait_for`` times out, its client closes, the gateway
connection it came through is reset — and every hop must have stopped
within 50 ms of that moment, long before the call's 10 s deadline.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lineclient import LineClient, line_clients

from meshkit import AsyncClient, ClientClosedError, Settings
from meshkit.testing import ServiceProcess

pytestmark = pytest.mark.integration

StartService = Callable[..., list[ServiceProcess]]
CHAIN = "tests.integration.services.chain"
HOPS = ("a", "b", "c")
LIMIT = 0.050  # seconds from the caller giving up to every hop having stopped
_WAIT = 10.0


@pytest.fixture
def chain_log(tmp_path: Path) -> Path:
    return tmp_path / "chain.log"


@pytest.fixture
def chain(start_service: StartService, chain_log: Path) -> None:
    env = {"CHAIN_LOG": str(chain_log)}
    for name in ("ChainA", "ChainB", "ChainC"):
        start_service(f"{CHAIN}:{name}", env=env)


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


def events(log: Path, tag: str) -> dict[tuple[str, str], float]:
    """``(hop, event) -> time`` of the lines the hops wrote for ``tag``."""
    if not log.exists():
        return {}
    found = {}
    for line in log.read_text().splitlines():
        t, hop, event, at = line.split()
        if t == tag:
            found[(hop, event)] = float(at)
    return found


async def until(log: Path, tag: str, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Wait (polling the file, with a deadline) until every ``wanted`` event of ``tag`` is there."""
    deadline = time.monotonic() + _WAIT
    while True:
        seen = events(log, tag)
        if all(w in seen for w in wanted):
            return seen
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {wanted} were recorded"
        await asyncio.sleep(0.005)


STARTED = [(hop, "started") for hop in HOPS]
CANCELLED = [(hop, "cancelled") for hop in HOPS]


def assert_stopped_within_limit(seen: dict[tuple[str, str], float], gave_up: float) -> None:
    delays = {hop: seen[(hop, "cancelled")] - gave_up for hop in HOPS}
    print("stopped after (ms):", {h: round(d * 1000, 1) for h, d in delays.items()})
    assert all(d <= LIMIT for d in delays.values()), f"stopped after (s): {delays}"
    assert ("c", "finished") not in seen


async def ready_client(settings: Settings) -> AsyncClient:
    client = AsyncClient(settings)
    await client.start()
    return client


def new_tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.mark.parametrize("leaf", ["work", "grind"])
def test_a_cancelled_caller_task_stops_every_hop(chain: None, chain_log: Path, mesh_settings: Settings,
                                                 leaf: str) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        try:
            tag = new_tag()
            task = asyncio.create_task(client.call("chain-a", "begin", [tag, leaf], timeout=10, wait=True))
            await until(chain_log, tag, STARTED)
            gave_up = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert_stopped_within_limit(await until(chain_log, tag, CANCELLED), gave_up)
        finally:
            await client.close()
    asyncio.run(main())


def test_a_wait_for_timeout_stops_every_hop(chain: None, chain_log: Path, mesh_settings: Settings) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        try:
            tag = new_tag()
            # The view may not list the chain yet: a first call waits for it, outside the measurement.
            warm = new_tag()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.call("chain-a", "begin", [warm, "work"], timeout=10, wait=True), 2.0)
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.call("chain-a", "begin", [tag, "work"], timeout=10), 0.5)
            gave_up = began + 0.5  # when wait_for fired (it cannot fire earlier)
            seen = await until(chain_log, tag, CANCELLED)
            assert all(seen[(hop, "started")] < gave_up for hop in HOPS)
            assert_stopped_within_limit(seen, gave_up)
        finally:
            await client.close()
    asyncio.run(main())


def test_closing_the_client_stops_every_hop(chain: None, chain_log: Path, mesh_settings: Settings) -> None:
    async def main() -> None:
        client = await ready_client(mesh_settings)
        tag = new_tag()
        task = asyncio.create_task(client.call("chain-a", "begin", [tag, "work"], timeout=10, wait=True))
        await until(chain_log, tag, STARTED)
        gave_up = time.monotonic()
        await client.close()
        with pytest.raises(ClientClosedError):
            await task
        assert_stopped_within_limit(await until(chain_log, tag, CANCELLED), gave_up)
    asyncio.run(main())


def reset(client: LineClient) -> None:
    """Close with a TCP RST (``SO_LINGER`` 0): the client is gone, not half-closed."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def test_a_gateway_client_disconnecting_stops_every_hop(
    chain: None, chain_log: Path, start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    [gw] = start_service("meshkit.gateway:Gateway",
                         env={"MESHKIT_GATEWAY_SERVICES": "chain-a", "MESHKIT_GATEWAY_REQUEST_TIMEOUT": "10"})
    assert gw.record is not None
    client = clients(gw.record.listeners["stratum"])
    tag = new_tag()
    client.request("chain-a.begin", [tag, "work"])

    async def main() -> dict[tuple[str, str], Any]:
        return await until(chain_log, tag, STARTED)
    asyncio.run(main())
    gave_up = time.monotonic()
    reset(client)

    async def stopped() -> dict[tuple[str, str], float]:
        return await until(chain_log, tag, CANCELLED)
    assert_stopped_within_limit(asyncio.run(stopped()), gave_up)
