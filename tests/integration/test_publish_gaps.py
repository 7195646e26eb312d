"""Push-publish is at most once, and a subscriber sees what it missed (real processes).

A subscriber whose push queue holds one push is sent a burst: the pushes it
refused (``overloaded``) are not resent, and the next push it handles
reports exactly that many missed, in ``current_call().gap``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from meshkit import AsyncClient, Settings
from meshkit.testing import ServiceProcess

pytestmark = pytest.mark.integration

StartService = Callable[..., list[ServiceProcess]]


def test_the_gaps_a_subscriber_sees_are_the_pushes_it_did_not_run(
    start_service: StartService, mesh_settings: Settings
) -> None:
    start_service("tests.integration.services.gaps:GapProbe",
                  settings=dataclasses.replace(mesh_settings, max_queued_pushes=1))

    async def main() -> None:
        async with AsyncClient(mesh_settings) as client:
            await client.call("gapprobe", "seen", wait=True)  # the view lists it: the publishes reach it
            burst = await asyncio.gather(*(client.publish("gap.test", i, timeout=5) for i in range(20)))
            assert await client.publish("gap.test", "last", timeout=5) == 1
            seen = await client.call("gapprobe", "seen")
            missed = burst.count(0)
            assert missed > 0, "the burst should overflow a queue of one"
            assert len(seen) == 21 - missed and seen[-1][0] == "last"
            numbers = [s[1] for s in seen]
            assert numbers == sorted(numbers) and numbers[-1] == 21  # one stream, numbered from 1
            assert sum(s[2] for s in seen) == missed  # every push not run is counted, once
            assert not any(s[3] for s in seen)  # the number is not part of the handler's meta
    asyncio.run(main())
