"""Failures under steady load: an instance killed, hung or stopped, and Redis going away.

Each test runs a few threads calling all the time through one blocking
client and checks every single outcome afterwards.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
from loadgen import Load, Outcome
from rawpeer import RawPeer

import meshkit
from meshkit import Client, wire
from meshkit.testing import RedisServer, read_records, test_settings, wait_until

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"


def mixed_load(client: Client, sleep: float) -> Load:
    """Two threads calling idempotent ``echo``, two calling non-idempotent ``sleep``."""
    load = Load()
    load.add("echo", lambda: client.call("echo", "echo", ["x"]), threads=2)
    load.add("sleep", lambda: client.call("echo", "sleep", [sleep]), threads=2)
    return load


def describe(outcomes: list[Outcome], since: float) -> str:
    return "; ".join(f"{o.label}@{o.started - since:+.3f}s {type(o.error).__name__}"
                     for o in outcomes if o.error is not None)


# A killed victim's record outlives the test (its TTL is far past every
# deadline here), so only the client's own loss detection can route around
# it. A hung one keeps the test TTL (2 s): while its record stands, the pool
# tries a failed instance again after pool.RETRY_FAILED_AFTER, and a hung
# process would fail those calls too.
LONG_TTL = 60.0
# Generous, for a noisy machine: detection takes ~0 s (SIGKILL) or ~1 s
# (SIGSTOP: ping_after + dead_after), and anything under LONG_TTL proves the
# point. The positive signal waited for is a run of clean calls.
DETECT_DEADLINE = 20.0
CLEAN_CALLS = 10


def routed_since(load: Load, victim_id: str, lost_at: float) -> float | None:
    """When calls stopped reaching ``victim_id``: the end of the last bad call after ``lost_at``.

    ``None`` until every calling thread has made :data:`CLEAN_CALLS` calls
    since then, all of them answered by another instance (a thread still
    blocked on the lost instance has made none). Only ``sleep`` answers name
    the instance that served them.
    """
    outcomes = load.snapshot()
    bad = [o.ended for o in outcomes
           if o.error is not None or (o.label == "sleep" and o.result == victim_id)]
    since = max([lost_at, *bad])
    after = Counter(o.worker for o in outcomes if o.started > since)
    return since if all(after[w] >= CLEAN_CALLS for w in load.workers) else None


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_lost_instance_is_routed_around(start_service, redis_server: RedisServer, how: str) -> None:
    """A killed (connection closed) or hung (silent) instance costs only the calls it held."""
    settings = test_settings(redis_server.url, **({"ttl": LONG_TTL} if how == "SIGKILL" else {}))
    victim, *_ = start_service(ECHO, count=3, settings=settings)
    victim_id = victim.record.instance_id
    with Client(settings) as client, mixed_load(client, sleep=0.2) as load:
        load.wait_for_calls(30)
        wait_until(lambda: any(o.result == victim_id for o in load.snapshot()), 10.0,
                   "the victim to serve some calls")
        victim.process.send_signal(getattr(signal, how))
        lost_at = time.monotonic()
        # Routed around, positively: a run of clean calls after the signal,
        # long before the record's TTL would have dropped it.
        wait_until(lambda: routed_since(load, victim_id, lost_at) is not None,
                   DETECT_DEADLINE, "calls to stop reaching the lost instance")
    routed_at = routed_since(load, victim_id, lost_at)
    assert routed_at is not None
    outcomes = load.outcomes
    if how == "SIGKILL":
        assert any(r.instance_id == victim_id for r in read_records(settings)), "routed around by its TTL"

    # Idempotent calls in flight to the lost instance were retried elsewhere.
    assert not load.failures("echo"), describe(load.failures("echo"), lost_at)
    # Non-idempotent ones may fail, but only as LostPeerError, only those that
    # were sent before it was known to be gone, and no more than were in
    # flight to it (two sleep threads, each blocked on its call).
    failed = load.failures("sleep")
    assert all(isinstance(o.error, meshkit.LostPeerError) for o in failed), describe(failed, lost_at)
    assert all(o.started < routed_at for o in failed), describe(failed, lost_at)
    assert len(failed) <= 3
    # Once routed around, every call succeeds, from the other instances.
    later = [o for o in outcomes if o.started >= routed_at]
    assert len(later) >= CLEAN_CALLS * len(load.workers)
    assert all(o.error is None for o in later), describe(later, lost_at)
    assert all(o.result != victim_id for o in later if o.label == "sleep")
    # The figures this test is about (shown with -s).
    touched = [(o.label, round(o.started - lost_at, 2), round(o.latency, 2)) for o in outcomes
               if o.started < lost_at and o.ended > lost_at
               and (o.error is not None or o.latency > 0.35)]
    print(f"\n{how}: {len(outcomes)} calls, {len(failed)} LostPeerError "
          f"({describe(failed, lost_at) or 'none'}); routed around {routed_at - lost_at:.2f}s after the "
          f"signal; calls delayed or failed by the loss (label, start, latency) {touched}")


def test_sigterm_under_load_loses_nothing(start_service, mesh_client: Client, mesh_settings,
                                          zmq_ctx) -> None:
    victim, *_ = start_service(ECHO, count=3)
    victim_id = victim.record.instance_id
    with mixed_load(mesh_client, sleep=0.3) as load, RawPeer(zmq_ctx, victim.record.endpoint) as raw:
        load.wait_for_calls(30)
        wait_until(lambda: any(o.result == victim_id for o in list(load.outcomes)), 5.0,
                   "the victim to serve some calls")
        # Work surely in flight on the victim when the signal lands: the PONG
        # to a PING sent after the CALL counts it in flight.
        raw.send(wire.encode_call(7, "echo", "sleep", [0.5], {}, 5000, None, None))
        pong, (state, inflight) = raw.answer(wire.encode_ping(8))
        assert (pong.kind, state) == (wire.PONG, "up") and inflight >= 1
        stopping = time.monotonic()
        code = victim.terminate(timeout=15)
        stopped = time.monotonic()
        # Deregistered before exiting: nobody waits for a TTL.
        assert victim_id not in {r.instance_id for r in read_records(mesh_settings, "echo")}
        load.wait_for_calls(20)
        answer = raw.recv(2.0)
    assert code == 0, victim.tail()
    assert not load.failures(), describe(load.failures(), stopping)
    assert answer is not None, "the call in flight was not answered before exit"
    assert wire.decode_header(answer[0]).kind == wire.REPLY
    assert wire.unpack(answer[1]) == victim_id
    print(f"\nSIGTERM: {len(load.outcomes)} calls, 0 failed; exit 0 after {stopped - stopping:.2f}s")


def test_redis_outage_does_not_stop_traffic(start_service) -> None:
    server = RedisServer().start()
    try:
        settings = test_settings(server.url)
        procs = start_service(ECHO, count=3, settings=settings)
        ids = {p.record.instance_id for p in procs}
        with Client(settings) as client:
            wait_until(lambda: len(client.instances("echo")) == 3, 5.0, "the client to see 3 instances")
            with mixed_load(client, sleep=0.05) as load:
                load.wait_for_calls(30)
                server.kill()
                down = time.monotonic()
                load.run_for(2.5)  # longer than the records' TTL
                during = load.count()
                server.start()
                up = time.monotonic()
                wait_until(lambda: {r.instance_id for r in read_records(settings)} == ids, 5.0,
                           "every instance to register again")
                back = time.monotonic()
                load.wait_for_calls(30)
            assert not load.failures(), describe(load.failures(), down)
            served = {o.result for o in load.outcomes if o.label == "sleep" and down < o.started < up}
            assert served == ids  # every known instance kept serving
        with Client(settings) as fresh:
            assert {r.instance_id for r in fresh.instances("echo")} == ids
            assert fresh.call("echo", "echo", [1]) == 1
        print(f"\nRedis outage: {len(load.outcomes)} calls ({during} before the restart), 0 failed; "
              f"records back {back - up:.2f}s after Redis restarted")
    finally:
        server.stop()
