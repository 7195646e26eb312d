"""Calls that fail well, with real processes: fail over at once after kill -9, outlier
ejection of an instance that always fails, and a retry budget that stops a retry storm.

See docs/failover.md. Timings are from the calling side, on a shared machine.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from test_cli import clean_env

from meshkit import AsyncClient, Client, HandlerError, Settings, wire
from meshkit.ejection import Health
from meshkit.errors import CallError
from meshkit.testing import RedisServer, StartService, read_records, settings_env, test_settings

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
FLAKY = "tests.integration.services.flaky:Flaky"
WORKER = "tests.integration.services.worker:Worker"


def test_fresh_clients_fail_over_at_once_after_kill_9(start_service: StartService,
                                                       redis_server: RedisServer) -> None:
    """While a killed instance's record stands, no fresh client waits for its connect timeout."""
    settings = test_settings(redis_server.url, ttl=60.0)  # the dead record outlives the test
    victim, survivor = start_service(ECHO, count=2, settings=settings)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    assert victim.record is not None and survivor.record is not None
    latencies = []
    for i in range(20):
        with Client(settings) as client:
            assert {r.key for r in client.instances()} >= {victim.record.key, survivor.record.key}
            started = time.monotonic()
            assert client.call("echo", "echo", [i], timeout=5.0) == i
            latencies.append(time.monotonic() - started)
    assert any(r.key == victim.record.key for r in read_records(settings)), "the dead record is still listed"
    print(f"\nfresh-client calls after kill -9: max {max(latencies) * 1000:.1f} ms, "
          f"median {sorted(latencies)[10] * 1000:.1f} ms (connect timeout {settings.dead_after}s)")
    assert max(latencies) < 0.1, [round(x * 1000, 1) for x in latencies]


async def _run_calls(client: AsyncClient, seconds: float) -> list[tuple[float, bool]]:
    """Sequential calls to ``flaky.work`` for ``seconds``: (start time since the first, succeeded)."""
    outcomes = []
    t0 = time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        try:
            await client.call("flaky", "work", timeout=2.0)
            outcomes.append((now - t0, True))
        except HandlerError:
            outcomes.append((now - t0, False))
    return outcomes


def test_an_instance_that_always_fails_is_ejected(start_service: StartService,
                                                  mesh_settings: Settings) -> None:
    """With one of two instances raising on every call, errors fall below 5% within a second."""
    (bad,) = start_service(FLAKY, env={"FLAKY_FAIL": "1"})
    start_service(FLAKY)
    assert bad.record is not None

    async def main() -> tuple[list[tuple[float, bool]], Any]:
        async with AsyncClient(mesh_settings) as client:
            outcomes = await _run_calls(client, 4.0)
            return outcomes, client.pool.ejector.snapshot()

    outcomes, states = asyncio.run(main())
    first = [ok for t, ok in outcomes if t < 1.0]
    later = [ok for t, ok in outcomes if t >= 1.0]
    rate = later.count(False) / len(later)
    print(f"\nejection: {first.count(False)} errors in {len(first)} calls of the first second, "
          f"then {later.count(False)} in {len(later)} ({rate:.2%}); state {states}")
    assert first.count(False) >= 7, "the failing instance was reached"
    assert rate < 0.05
    assert [(s.key, s.health) for s in states] in ([(bad.record.key, Health.EJECTED)],
                                                    [(bad.record.key, Health.PROBING)])
    assert states[0].ejections >= 2, "probed, failed the probe, ejected again"


def test_a_saturated_service_gets_no_retry_storm(start_service: StartService,
                                                 mesh_settings: Settings) -> None:
    """Both instances answer ``overloaded`` to most calls: retries stay within the budget."""
    start_service(WORKER, count=2, settings=mesh_settings.replace(max_inflight=1),
                  env={"WORKER_DELAY": "0.1"})
    attempts = 0
    results: dict[str, int] = {}

    async def caller(client: AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            try:
                await client.call("worker", "work", timeout=1.0)
                name = "ok"
            except CallError as exc:
                name = str(exc.code)
            results[name] = results.get(name, 0) + 1

    async def main() -> tuple[int, int, int]:
        nonlocal attempts
        async with AsyncClient(mesh_settings) as client:
            start = client.exchange.start

            def counted(*args: Any) -> Any:
                nonlocal attempts
                attempts += isinstance(args[1], wire.CallMessage)  # not the pool's load PINGs
                return start(*args)

            client.exchange.start = counted  # type: ignore[method-assign]
            until = time.monotonic() + 3.0
            await asyncio.gather(*(caller(client, until) for _ in range(20)))
            budget = client.pool.retry_budget
            return sum(results.values()), budget.retried, budget.refused

    calls, retried, refused = asyncio.run(main())
    print(f"\nsaturated: {calls} calls {results}, {attempts} attempts sent, {retried} retries, "
          f"{refused} refused by the budget")
    assert results.get("ok", 0) >= 10, "the instances did serve"
    assert refused > 0, "the budget was what stopped the retries"
    # Every attempt past a call's first is a retry the budget allowed: 20% of the calls plus a
    # floor of 10 a second over the 10 s window (the run is shorter than the window).
    assert attempts - calls == retried
    assert retried <= 0.2 * calls + 10 * 10 + 1


def test_choice_follows_the_load_instances_report(start_service: StartService,
                                                  mesh_settings: Settings) -> None:
    """A caller avoids an instance another caller keeps busy, which its own counts cannot show."""
    busy, idle = start_service(ECHO, count=2)
    assert busy.record is not None and idle.record is not None

    async def main() -> tuple[list[str], int | None]:
        async with AsyncClient(mesh_settings) as other, AsyncClient(mesh_settings) as caller:
            held = [asyncio.ensure_future(other.call_instance(busy.record.instance_id, "sleep", 4.0))
                    for _ in range(30)]
            assert await caller.call("echo", "echo", [0]) == 0  # connect to some instance
            deadline = time.monotonic() + 5.0
            while (caller.pool.reported_load(busy.record.key) or 0) < 30:
                assert time.monotonic() < deadline, "no PONG reported the busy instance's load"
                await caller.call("echo", "echo", [0])  # connects to both meanwhile
                await asyncio.sleep(0.02)
            served = [await caller.call("echo", "sleep", [0.0]) for _ in range(40)]
            for call in held:
                call.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            return served, caller.pool.reported_load(busy.record.key)

    served, reported = asyncio.run(main())
    print(f"\nload reports: the busy instance reported {reported} in flight; "
          f"{served.count(busy.record.instance_id)} of 40 calls went to it")
    assert served.count(busy.record.instance_id) <= 2


def test_meshkit_ejections_shows_what_each_caller_ejected(start_service: StartService, mesh_client: Client,
                                                          mesh_settings: Settings) -> None:
    """An instance's own calls eject the failing instance; ``meshkit ejections`` shows it from outside."""
    settings = mesh_settings.replace(eject_base_time=30.0)  # still ejected when the commands look
    (bad,) = start_service(FLAKY, env={"FLAKY_FAIL": "1"}, settings=settings)
    (good,) = start_service(FLAKY, settings=settings)
    assert bad.record is not None and good.record is not None
    failed = mesh_client.call_instance(good.record.instance_id, "call_work", 60)
    assert 7 <= failed < 30, failed
    env = clean_env(**settings_env(mesh_settings))
    result = subprocess.run([sys.executable, "-m", "meshkit", "ejections", "flaky", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert set(reports) == {bad.record.key, good.record.key}
    (row,) = reports[good.record.key]["instances"]
    assert (row["key"], row["health"], row["ejections"]) == (bad.record.key, "ejected", 1)
    assert reports[bad.record.key]["instances"] == []  # it called nobody
    text = subprocess.run([sys.executable, "-m", "meshkit", "ejections"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert bad.record.key in text.stdout and "ejected" in text.stdout and "RETRIES" in text.stdout
