"""Limits with real processes: concurrency gates, typed arguments, cluster-wide resources shared through Redis."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from meshkit import AsyncClient, BadArgumentsError, CallError, RemoteError, ResourceExhaustedError, Settings
from meshkit.leases import window_quota
from meshkit.testing import settings_env

pytestmark = pytest.mark.integration

LIMITED = "tests.integration.services.limited:Limited"
ROOT = Path(__file__).resolve().parents[2]


def resources_file(tmp_path: Path, **limit: float) -> dict[str, str]:
    path = tmp_path / "limits.toml"
    body = "".join(f"{key} = {value}\n" for key, value in limit.items())
    path.write_text(f"[resources.payments_api]\n{body}")
    return {"MESHKIT_CONFIG": str(path)}


async def hammer(settings: Settings, method: str, args: list[Any], callers: int, seconds: float,
                 timeout: float = 5.0) -> tuple[list[list[Any]], list[BaseException]]:
    """``callers`` concurrent loops calling ``method`` for ``seconds``; answers and errors."""
    answers: list[list[Any]] = []
    errors: list[BaseException] = []
    async with AsyncClient(settings) as client:
        stop = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop:
                try:
                    answers.append(await client.call("limited", method, args, timeout=timeout))
                except CallError as exc:
                    errors.append(exc)
                    await asyncio.sleep(0.005)  # a refused caller tries again soon, not in a hot loop

        await asyncio.gather(*(caller() for _ in range(callers)))
    return answers, errors


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def most_in_a_second(starts: list[float]) -> int:
    starts = sorted(starts)
    most = j = 0
    for i, t in enumerate(starts):
        while starts[j] <= t - 1.0:
            j += 1
        most = max(most, i - j + 1)
    return most


def test_a_method_past_its_concurrency_and_queue_is_answered_overloaded_at_once(
        start_service, mesh_settings: Settings, tmp_path: Path) -> None:
    start_service(LIMITED, env=resources_file(tmp_path, rate=1000))

    async def main() -> tuple[list[Any], float]:
        async with AsyncClient(mesh_settings) as client:
            t0 = time.monotonic()

            async def one() -> Any:
                try:
                    return await client.call("limited", "hold", [0.5])
                except RemoteError as exc:
                    return (exc, time.monotonic() - t0)

            return await asyncio.gather(*(one() for _ in range(8))), time.monotonic() - t0

    results, took = asyncio.run(main())
    refused = [r for r in results if isinstance(r, tuple)]
    served = [r for r in results if isinstance(r, str)]
    # 2 run, 2 wait for them (done after ~1 s), 4 are refused at once
    assert len(served) == 4 and len(refused) == 4, results
    assert all("[overloaded]" in str(exc) and elapsed < 0.4 for exc, elapsed in refused), refused
    assert 0.9 < took < 5.0


def test_typed_arguments_are_checked_before_the_handler(start_service, mesh_client, tmp_path: Path) -> None:
    start_service(LIMITED, env=resources_file(tmp_path, rate=1000))
    assert mesh_client.call("limited", "typed", [2, "ab"]) == "abab"
    with pytest.raises(BadArgumentsError, match=r"parameter 'n' expects int: Expected `int`, got `str`"):
        mesh_client.call("limited", "typed", ["5", 6])


def test_three_instances_never_exceed_a_shared_rate_by_more_than_one_window(
        start_service, mesh_settings: Settings, tmp_path: Path) -> None:
    rate, window = 200, 0.1
    start_service(LIMITED, count=3, env=resources_file(tmp_path, rate=rate, window=window, lease_fraction=0.25))
    answers, errors = asyncio.run(hammer(mesh_settings, "pay", [], callers=30, seconds=3.0))
    assert not errors, errors[:3]
    # Exact, by the windows the tokens came from: each window's quota, and any second's worth of windows.
    per_window = Counter(a[3] for a in answers)
    first, last = min(per_window), max(per_window)
    assert all(per_window[i] <= window_quota(rate, window, i) for i in per_window), per_window
    ten = max(sum(per_window[i + k] for k in range(10)) for i in range(first, last - 8))
    assert ten <= rate, ten
    # By the clock, the sliding second: docs/limits.md's slack of one window's quota. A process
    # descheduled between taking a token and reading the time shifts a start later, hence the margin.
    slack = math.ceil(rate * window)
    busiest = most_in_a_second([a[0] for a in answers])
    assert busiest <= rate + 2 * slack, busiest
    assert len({a[2] for a in answers}) == 3  # every instance took part
    assert len(answers) >= rate * 2.0, len(answers)  # and the limit is reached, not just respected
    use = asyncio.run(instance_use(mesh_settings, 3))
    leases = sum(u["payments_api"]["leases"] for u in use)
    assert leases < len(answers) / 2, (leases, len(answers))  # batches, not a round trip per call
    print(f"rate {rate}/s: {len(answers)} calls in 3 s, busiest 10 windows {ten}, busiest second {busiest} "
          f"(bound {rate + slack}), {leases} Redis round trips")


def test_three_instances_never_exceed_a_shared_concurrency(
        start_service, mesh_settings: Settings, tmp_path: Path) -> None:
    limit = 4
    start_service(LIMITED, count=3, env=resources_file(tmp_path, concurrency=limit, lease_fraction=0.25))
    answers, errors = asyncio.run(hammer(mesh_settings, "pay", [0.02], callers=24, seconds=3.0))
    use = asyncio.run(instance_use(mesh_settings, 3))
    assert not errors, (errors[:3], len(errors), len(answers), use)
    intervals = [(a[0], a[1]) for a in answers]
    at_once = most_at_once(intervals)
    assert at_once <= limit, at_once
    assert at_once == limit  # the limit is reached
    per_instance = Counter(a[2] for a in answers)
    # Fair shares: no instance is starved by another that keeps reusing its own slots.
    assert len(per_instance) == 3 and min(per_instance.values()) > len(answers) * 0.1, per_instance
    leases = sum(u["payments_api"]["leases"] for u in use)
    print(f"concurrency {limit}: {len(answers)} calls in 3 s, most at once {at_once}, {leases} Redis round trips, "
          f"per instance {sorted(per_instance.values())}")


def test_a_method_that_does_not_wait_is_refused_resource_exhausted(
        start_service, mesh_settings: Settings, tmp_path: Path) -> None:
    start_service(LIMITED, count=2, env=resources_file(tmp_path, concurrency=2))
    answers, errors = asyncio.run(hammer(mesh_settings, "pay_now", [0.05], callers=10, seconds=1.5))
    assert answers and errors
    assert all(isinstance(e, ResourceExhaustedError) for e in errors), errors[:3]
    assert "at its cluster-wide concurrency of 2" in str(errors[0])
    assert most_at_once([(a[0], a[1]) for a in answers]) <= 2


async def instance_use(settings: Settings, count: int) -> list[dict[str, Any]]:
    """``resource_use`` of ``count`` distinct instances (asked until each has answered)."""
    found: dict[str, dict[str, Any]] = {}
    async with AsyncClient(settings) as client:
        deadline = time.monotonic() + 10
        while len(found) < count:  # instance choice spreads the calls; ask until each has answered
            assert time.monotonic() < deadline, found
            answer = await client.call("limited", "resource_use")
            found[answer["instance"]] = answer["use"]
    return list(found.values())


def run_meshkit(*args: str, settings: Settings, config: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}
    env.update(settings_env(settings), PYTHONPATH=str(ROOT), **config)
    return subprocess.run([sys.executable, "-m", "meshkit", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_the_cli_shows_signatures_and_the_clusters_resource_use(
        start_service, mesh_client, mesh_settings: Settings, tmp_path: Path) -> None:
    config = resources_file(tmp_path, rate=1000, concurrency=5, window=1.0)  # ten windows: 10 s
    start_service(LIMITED, count=2, env=config)
    listed = run_meshkit("ls", "limited", "--json", settings=mesh_settings, config=config)
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert [r["signatures"]["typed"] for r in records] == ["(n: int, s: str) -> str"] * 2
    assert records[0]["signatures"]["hold"] == "(seconds: float) -> str"

    bad = run_meshkit("call", "limited", "typed", '"5"', "6", settings=mesh_settings, config=config)
    assert bad.returncode == 1
    assert "parameter 'n' expects int" in bad.stderr and "typed(n: int, s: str) -> str" in bad.stderr, bad.stderr

    for _ in range(30):
        mesh_client.call("limited", "pay")
    shown = run_meshkit("resources", "--json", settings=mesh_settings, config=config)
    assert shown.returncode == 0, shown.stderr
    [usage] = json.loads(shown.stdout)
    assert usage["resource"] == "payments_api" and usage["rate"] == 1000 and usage["concurrency"] == 5
    # The last ten windows' grants: every token spent was granted, and a lease asks for no more than the
    # one token needed or what the instance spent in the window before (meshkit.leases.RateLease.want),
    # so what lapses unspent in a window is at most the spend before it: between the 30 spent and twice that.
    assert 30 <= sum(usage["rate_used"]) <= 60, usage["rate_used"]
    table = run_meshkit("resources", settings=mesh_settings, config=config)
    assert table.stdout.split("\n")[0].split()[:3] == ["RESOURCE", "RATE/S", "WINDOW"]
    assert "payments_api" in table.stdout


def test_slots_of_an_instance_killed_mid_call_lapse_after_the_lease_ttl(
        start_service, mesh_settings: Settings, tmp_path: Path) -> None:
    ttl = 1.0
    config = resources_file(tmp_path, concurrency=2, lease_ttl=ttl)
    [doomed] = start_service(LIMITED, env=config)

    async def main() -> float:
        async with AsyncClient(mesh_settings) as client:
            holding = [asyncio.ensure_future(client.call("limited", "pay", [30.0], timeout=60)) for _ in range(2)]
            deadline = time.monotonic() + 10
            while True:  # both slots held: a third call is refused at once
                assert time.monotonic() < deadline
                try:
                    await client.call("limited", "pay_now", [0.0])
                except ResourceExhaustedError:
                    break
                await asyncio.sleep(0.02)
            start_service(LIMITED, env=config)
            doomed.kill()
            killed = time.monotonic()
            while True:  # the dead instance's holding lapses after the ttl; then the survivor gets the slots
                assert time.monotonic() - killed < ttl + 5
                try:
                    await client.call("limited", "pay_now", [0.0])
                    break
                except CallError:  # resource_exhausted, or lost_peer/timeout from the dead one
                    await asyncio.sleep(0.02)
            for task in holding:
                task.cancel()
            await asyncio.gather(*holding, return_exceptions=True)
            return time.monotonic() - killed

    lapsed = asyncio.run(main())
    # Renewed every ttl / 3, so the last renewal was at most that long before the kill.
    assert ttl * 2 / 3 - 0.1 <= lapsed <= ttl + 1.0, lapsed
    print(f"slots of a killed instance free after {lapsed:.2f} s (lease_ttl {ttl} s)")
