"""A service's background work survives bad ticks; its settings are checked before anything binds.

No network: the service is built but never started; one run of a periodic
task is driven directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from meshkit import ConfigError, Service, Settings, periodic


class Ticker(Service):
    name = "ticker"

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)
        self.ticks = 0
        self.error: Exception = ValueError("bad tick")

    @periodic(1.0)
    async def tick(self) -> None:
        self.ticks += 1
        raise self.error


@pytest.fixture
def ticker() -> Iterator[Ticker]:
    service = Ticker(Settings.load(env={}))
    yield service
    service._executor.shutdown(wait=False)
    service._zmq.term()


def test_a_failing_periodic_task_is_logged_once_per_cause_and_keeps_running(
    ticker: Ticker, caplog: pytest.LogCaptureFixture
) -> None:
    (job,) = ticker._table.periodic

    async def main() -> list[bool]:
        results = [await ticker._periodic_jobs.run_once(job) for _ in range(5)]
        ticker.error = KeyError("other cause")
        results += [await ticker._periodic_jobs.run_once(job) for _ in range(3)]
        return results

    assert asyncio.run(main()) == [False] * 8
    assert ticker.ticks == 8 and ticker.periodic_failures == 8
    lines = [r.getMessage() for r in caplog.records
             if r.levelno == logging.ERROR and "periodic task tick failed" in r.getMessage()]
    assert len(lines) == 2
    assert "ValueError: bad tick" in lines[0] and "KeyError" in lines[1]


@pytest.mark.parametrize("host", ["fe80::1%x;shutdown frontend stratum ", "a b", "x\ny"])
def test_an_advertise_host_outside_the_grammar_stops_the_start(host: str) -> None:
    service = Ticker(Settings.load(env={}, advertise_host=host))
    try:
        with pytest.raises(ConfigError, match="advertise_host"):
            asyncio.run(service.start())
        assert service._server is None  # refused before anything was bound
    finally:
        service._executor.shutdown(wait=False)
        service._zmq.term()


@pytest.mark.parametrize(
    ("name", "address"),
    [("stratum", "fe80::1%x;shutdown frontend stratum :4000"), ("a:b", "10.0.0.1:4000"), ("stratum", "h:0")],
)
def test_a_listener_outside_the_grammar_is_refused(ticker: Ticker, name: str, address: str) -> None:
    with pytest.raises(ConfigError, match="cannot advertise listener"):
        ticker.advertise_listener(name, address)
