"""The registry view follows announced changes within about 100 ms (pub/sub, not the periodic rescan)."""

from __future__ import annotations

import asyncio
import time

from meshkit.config import Settings
from meshkit.record import DRAINING, InstanceRecord
from meshkit.registration import Registration
from meshkit.registry import Registry
from meshkit.testing import RedisServer, test_settings

# Generous for a shared 2-core machine; the rescan below is 30 s away, so
# only the change announcements can meet it.
_BOUND = 0.3


async def _seen(registry: Registry, predicate: object, timeout: float = 5.0) -> float:
    """Seconds until ``predicate(registry)`` holds, waiting on the view's change signal."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate(registry):
        left = timeout - (time.monotonic() - started)
        assert left > 0, "the view never followed"
        await registry.wait_changed(left)
    return time.monotonic() - started


def test_views_follow_changes_within_about_100_ms(redis_server: RedisServer) -> None:
    settings: Settings = test_settings(redis_server.url, resync_interval=30.0)
    record = InstanceRecord("viewed", "v1", "tcp://127.0.0.1:1", "h", 1, methods=("m",))

    async def main() -> list[float]:
        view = Registry(settings)
        await view.start()
        registration = Registration(settings, record)
        try:
            await registration.start()
            up = await _seen(view, lambda r: r.get(record.key) is not None)
            await registration.set_state(DRAINING)
            draining = await _seen(view, lambda r: r.get(record.key).state == DRAINING)
            await registration.stop()
            gone = await _seen(view, lambda r: r.get(record.key) is None)
            return [up, draining, gone]
        finally:
            await view.close()

    delays = asyncio.run(main())
    assert max(delays) < _BOUND, f"view followed after {delays} s"
