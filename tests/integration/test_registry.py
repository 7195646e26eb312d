"""The registry view: it follows announced changes within about 100 ms (pub/sub, not the periodic
rescan), and it reads from Redis only valid records, bounded in bytes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from meshkit.config import Settings
from meshkit.errors import RegistryUnreachableError
from meshkit.record import DRAINING, InstanceRecord
from meshkit.registration import Registration
from meshkit.registry import Keys, Registry, load_records, read_records
from meshkit.testing import RedisServer, test_settings

pytestmark = pytest.mark.integration

# The rescan is this far away, so only the change announcements (pub/sub)
# can make a view follow within _BOUND; both are generous for a noisy
# machine (a view follows in about 100 ms; the figures print with -s).
_RESCAN = 600.0
_BOUND = 10.0


async def _seen(registry: Registry, predicate: object, timeout: float = _BOUND) -> float:
    """Seconds until ``predicate(registry)`` holds, waiting on the view's change signal."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate(registry):
        left = timeout - (time.monotonic() - started)
        assert left > 0, "the view never followed"
        await registry.wait_changed(left)
    return time.monotonic() - started


def test_views_follow_changes_through_the_announcements(redis_server: RedisServer) -> None:
    settings: Settings = test_settings(redis_server.url, resync_interval=_RESCAN)
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
    print(f"\nview followed up, draining, gone after {[round(d, 3) for d in delays]} s")


def test_scans_reject_what_is_not_a_valid_record_under_its_own_key(redis_server: RedisServer) -> None:
    settings = test_settings(redis_server.url, resync_interval=30.0)
    keys = Keys(settings.namespace)
    good = InstanceRecord("viewed", "g1", "tcp://127.0.0.1:1", "h", 1)
    client = redis_server.client()
    try:
        client.set(keys.instance(good.key), good.to_json(), px=60_000)
        client.set(keys.instance("viewed:giant"), b"{" + b" " * (10 * 1024 * 1024), px=60_000)  # 10 MiB
        client.set(keys.instance("viewed:other"), good.to_json(), px=60_000)  # g1's record under another key
        client.hset(keys.instance("viewed:hash"), "a", "b")
        client.set(keys.instance("viewed:deep"), "[" * 50_000, px=60_000)

        async def main() -> tuple[list[str], int]:
            view = Registry(settings)
            await view.start()
            try:
                return [r.key for r in view.instances()], view.rejected
            finally:
                await view.close()

        found, rejected = asyncio.run(main())
        assert found == [good.key]
        assert rejected == 4
        assert [r.key for r in read_records(settings)] == [good.key]
    finally:
        client.close()


def test_load_records_tells_unreachable_from_empty(redis_server: RedisServer, tmp_path: Path) -> None:
    assert load_records(test_settings(redis_server.url)) == []
    settings = test_settings(f"unix://{tmp_path}/nowhere.sock?password=hunter2")
    with pytest.raises(RegistryUnreachableError) as caught:
        load_records(settings)
    assert "password=***" in str(caught.value) and "hunter2" not in str(caught.value)
    assert "No such file" in caught.value.cause
