"""An instance's own record: refused when outside the grammar, and loud when it cannot be written.

No Redis here: the URL points at a unix socket that does not exist, so every
write fails at once, and a fake clock drives the reports.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.record import InstanceRecord
from meshkit.registration import REPORT_AFTER, REPORT_EVERY, Registration
from meshkit.testing import FakeClock

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
