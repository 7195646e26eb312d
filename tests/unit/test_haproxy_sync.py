"""The sync loop survives bad data: no HAProxy, no Redis, no sleeps (fakes for the registry and the runtime API)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from meshkit import Settings
from meshkit.haproxy import process
from meshkit.haproxy.config import ProxyConfig, parse_proxy_config
from meshkit.haproxy.render import RuntimePaths, structure_fingerprint
from meshkit.haproxy.runtime import ServerState
from meshkit.haproxy.sync import HAProxySync
from meshkit.record import InstanceRecord

REPO = Path(__file__).resolve().parents[2]


def config() -> ProxyConfig:
    data: dict[str, Any] = {
        "haproxy": {"reconcile_interval": 30.0},
        "frontend": [{"name": "stratum", "bind": "127.0.0.1:3333", "service": "gateway", "listener": "stratum"}],
    }
    return parse_proxy_config(data, base=REPO / "configs")


def gateway(instance: str, stratum: str) -> InstanceRecord:
    return InstanceRecord(service="gateway", instance_id=instance, endpoint="tcp://10.0.0.1:5000", host="h",
                          pid=1, state="up", listeners={"stratum": stratum})


class FakeRegistry:
    """What the sync uses of :class:`~meshkit.registry.Registry`; ``instances`` raises what ``failures`` holds."""

    def __init__(self, records: list[InstanceRecord]) -> None:
        self.records = records
        self.failures: list[Exception] = []
        self.synced = True

    def instances(self) -> list[InstanceRecord]:
        if self.failures:
            raise self.failures.pop(0)
        return list(self.records)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def add_listener(self, listener: Any) -> None:
        pass

    def remove_listener(self, listener: Any) -> None:
        pass


class FakeRuntime:
    """An HAProxy with one empty backend that accepts every command."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.fail_next: Exception | None = None

    async def servers(self) -> list[ServerState]:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return []

    async def backends(self) -> set[str]:
        return {"gateway.stratum"}

    async def command(self, command: str) -> str:
        self.sent.append(command)
        return ""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_sync(records: list[InstanceRecord]) -> tuple[HAProxySync, FakeRegistry, FakeRuntime, Clock]:
    clock = Clock()

    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    registry, runtime = FakeRegistry(records), FakeRuntime()
    sync = HAProxySync(Settings(), config(), RuntimePaths.in_dir("/nonexistent/run"), attach=True,
                       haproxy="/bin/false", runtime=runtime,  # type: ignore[arg-type]
                       clock=clock, sleep=no_sleep)
    sync.registry = registry  # type: ignore[assignment]
    # The structure HAProxy runs is the configured one: no reload (and no haproxy -c) in these tests.
    sync.keeper.loaded = structure_fingerprint(sync.model(records), sync.paths)
    return sync, registry, runtime, clock


def added(runtime: FakeRuntime) -> list[str]:
    return [c.split()[2] for c in runtime.sent if c.startswith("add server")]


def test_a_round_failing_on_bad_data_is_logged_once_and_the_next_round_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = gateway("gw1", "10.0.0.1:4000")
    bad = gateway("gw2", "not an address \x00" + "x" * 500)
    sync, registry, runtime, clock = make_sync([good])
    registry.records.append(bad)
    registry.failures = [ValueError("malformed record " + "y" * 1000), ValueError("malformed record again")]

    async def rounds() -> None:
        await sync.round()
        await sync.round()  # the same cause again, within the interval: not logged
        await sync.round()

    with caplog.at_level(logging.WARNING, logger="meshkit.haproxy.sync"):
        asyncio.run(rounds())
    assert sync.rounds == 3
    failed = [r for r in caplog.records if "round failed" in r.getMessage()]
    assert len(failed) == 1 and len(failed[0].getMessage()) < 300  # clipped, once
    # The bad record cannot become a server (reported, clipped); the good one is added.
    assert added(runtime) == ["gateway.stratum/gw1"]
    assert any("cannot route to" in r.getMessage() for r in caplog.records)
    assert all(len(r.getMessage()) < 400 for r in caplog.records)

    # Past the interval the same cause is logged again, with the count of what was suppressed.
    clock.now += 31.0
    registry.failures = [ValueError("malformed record")]
    runtime.fail_next = None
    with caplog.at_level(logging.WARNING, logger="meshkit.haproxy.sync"):
        asyncio.run(sync.round())
    again = [r for r in caplog.records if "round failed" in r.getMessage()]
    assert len(again) == 2 and getattr(again[-1], "suppressed", 0) == 1


def test_an_exception_from_haproxy_mid_round_does_not_end_the_sync() -> None:
    sync, _, runtime, _ = make_sync([gateway("gw1", "10.0.0.1:4000")])
    runtime.fail_next = RuntimeError("unexpected reply")

    async def rounds() -> None:
        await sync.round()
        await sync.round()

    asyncio.run(rounds())
    assert added(runtime) == ["gateway.stratum/gw1"]


def test_the_loop_of_rounds_is_restarted_when_an_exception_escapes_it(caplog: pytest.LogCaptureFixture) -> None:
    sync, _, _, _ = make_sync([])
    calls: list[int] = []

    async def round_() -> None:
        calls.append(len(calls))
        sync.wake()  # the next round at once, not after reconcile_interval
        if len(calls) == 1:
            raise RuntimeError("escaped the round")  # what round() itself never lets out
        if len(calls) == 3:
            sync.request_stop()

    sync.round = round_  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(sync.run(), 10))
    assert len(calls) == 3
    assert sync.loop is not None and sync.loop.restarts == 1
    assert [r for r in caplog.records if "haproxy-sync crashed" in r.getMessage()]


def test_stop_haproxy_looks_where_runtime_paths_put_things(tmp_path: Path) -> None:
    paths = RuntimePaths.in_dir(tmp_path)
    assert paths.config_file == tmp_path / process.CONFIG_NAME
    assert paths.pid_file == tmp_path / process.PID_NAME
    assert process.stop_haproxy(tmp_path, 1.0) == "none"  # no pid file: nothing to stop, at once


def test_a_pid_file_naming_another_program_names_no_master(tmp_path: Path) -> None:
    paths = RuntimePaths.in_dir(tmp_path)
    paths.pid_file.write_text("1\n")  # init: alive, but not an HAProxy running this config
    assert process.find_master(paths.config_file, paths.pid_file) is None
    paths.pid_file.write_text("garbage\n")
    assert process.find_master(paths.config_file, paths.pid_file) is None


def test_a_failed_takeover_falls_back_to_the_previous_master(tmp_path: Path) -> None:
    paths = RuntimePaths.in_dir(tmp_path)
    master = process.HAProxyMaster(paths.config_file, paths.master_socket, paths.pid_file, paths.stats_socket,
                                   haproxy="/bin/false")
    paths.pid_file.write_text("999999999\n")  # what the new master wrote before it failed
    master.fall_back(4242)
    assert master.pid == 4242
    assert paths.pid_file.read_text().split() == ["4242"]  # the next sync finds the master that serves
