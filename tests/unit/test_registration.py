"""An instance's own record: refused when outside the grammar, and loud when it cannot be written.

No Redis here: the URL points at a unix socket that does not exist, so every
write fails at once, and a fake clock drives the reports. The heartbeat and
the outages are driven on a MemoryRegistry, whose registrations share all
of Registration's logic but store the record in memory.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.record import InstanceRecord
from meshkit.registration import REPORT_AFTER, REPORT_EVERY, Registration
from meshkit.testing import FakeClock, MemoryRegistry

RECORD = InstanceRecord("echo", "e1", "tcp://127.0.0.1:4000", "h", 1)


def _settings(tmp_path: object) -> Settings:
    return Settings.load(env={}, redis_url=f"unix://{tmp_path}/missing/redis.sock?db=0&password=hunter2")


def test_a_record_outside_the_grammar_is_refused_at_the_writer(tmp_path: object) -> None:
    bad = InstanceRecord("gateway", "g1", "tcp://fe80::1%x;shutdown frontend stratum :4000", "h", 1)
    with pytest.raises(ConfigError, match="endpoint must be tcp://host:port"):
        Registration(_settings(tmp_path), bad)
    injected = InstanceRecord("gateway", "g1", "tcp://127.0.0.1:1", "h", 1,
                              listeners={"stratum": "fe80::1%x;shutdown frontend stratum :4000"})
    with pytest.raises(ConfigError, match="invalid registry record gateway:g1"):
        Registration(_settings(tmp_path), injected)


def test_an_instance_that_cannot_register_says_so_and_repeats_it(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(0.0)
    caplog.set_level(logging.INFO, "meshkit.registry")

    async def main() -> list[bool]:
        registration = Registration(_settings(tmp_path), RECORD, clock=clock)
        reports = []
        try:
            for now in (0.0, 1.0, REPORT_AFTER, REPORT_AFTER + 1, REPORT_AFTER + REPORT_EVERY):
                clock.advance(now - clock.now())
                await registration._write(announce=True)
                reports.append(registration.report())
        finally:
            await registration.abandon()
        assert not registration.registered and not registration.healthy
        return reports

    assert asyncio.run(main()) == [False, False, True, False, True]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    text = errors[0].getMessage()
    assert "echo:e1 is not registered" in text
    assert "password=***" in text and "hunter2" not in caplog.text
    assert "redis.sock" in text and "No such file" in text  # the URL and the cause


def test_report_is_quiet_while_registered() -> None:
    registration = Registration(Settings.load(env={}), RECORD, clock=FakeClock())
    registration.healthy = registration.registered = True
    assert not registration.report()
    asyncio.run(registration.abandon())


# -- the heartbeat, states and outages, on a MemoryRegistry and a FakeClock -----------------


def _memory(clock: FakeClock) -> MemoryRegistry:
    return MemoryRegistry(Settings.load(env={}, heartbeat_interval=1.0), clock=clock)


async def _turns() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_heartbeat_writes_once_per_interval_of_its_clock() -> None:
    async def main() -> list[int]:
        clock = FakeClock(0.0)
        registry = _memory(clock)
        await registry.start()
        registration = registry.registration(RECORD)
        await registration.start()
        await _turns()  # the heartbeat task starts its first sleep
        counts = [registry.writes[RECORD.key]]
        for step in (0.5, 0.5, 1.0, 1.0):
            clock.advance(step)
            await _turns()
            counts.append(registry.writes[RECORD.key])
        await registration.stop()
        assert RECORD.key not in registry.stored and registry.get(RECORD.key) is None
        return counts

    assert asyncio.run(main()) == [1, 1, 2, 3, 4]


def test_set_state_is_announced_at_once() -> None:
    async def main() -> str:
        registry = _memory(FakeClock(0.0))
        await registry.start()
        registration = registry.registration(RECORD)
        await registration.start()
        await registration.set_state("draining")
        state = registry.get(RECORD.key).state  # type: ignore[union-attr]
        await registration.abandon()
        assert RECORD.key in registry.stored  # abandoned: left to expire
        return state

    assert asyncio.run(main()) == "draining"


def test_an_outage_is_reported_on_the_clock_and_the_record_comes_back_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "meshkit.registry")

    async def main() -> None:
        clock = FakeClock(0.0)
        registry = _memory(clock)
        await registry.start()
        errors: list[int] = []
        registration = registry.registration(RECORD, lambda: errors.append(1))
        await registration.start()
        await _turns()
        assert registration.registered and registration.healthy
        registry.unreachable = True
        registry.remove(RECORD.key)  # a restarted, empty Redis
        for _ in range(int(REPORT_AFTER) + 1):
            clock.advance(1.0)
            await _turns()
        assert not registration.healthy and errors
        assert any("cannot refresh its registration" in r.getMessage() for r in caplog.records)
        registry.unreachable = False
        clock.advance(1.0)
        await _turns()
        assert registration.healthy and registry.get(RECORD.key) == RECORD  # written and announced again
        await registration.stop()

    asyncio.run(main())


def test_a_record_outside_the_grammar_is_refused_by_the_memory_registry_too() -> None:
    bad = InstanceRecord("gateway", "g1", "ipc:///tmp/x", "h", 1, listeners={"a b": "nowhere"})
    with pytest.raises(ConfigError, match="invalid registry record"):
        MemoryRegistry().registration(bad)
