"""Failures under steady load: an instance killed, hung or stopped, and Redis going away.

Each test runs a few threads calling all the time through one blocking
client and checks every single outcome afterwards.
"""

from __future__ import annotations

import signal
import time

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


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_lost_instance_is_routed_around(start_service, mesh_client: Client, how: str) -> None:
    """A killed (connection closed) or hung (silent) instance costs only the calls it held."""
    victim, *_ = start_service(ECHO, count=3)
    victim_id = victim.record.instance_id
    with mixed_load(mesh_client, sleep=0.2) as load:
        load.wait_for_calls(30)
        victim.process.send_signal(getattr(signal, how))
        lost_at = time.monotonic()
        load.run_for(2.5)
    outcomes = load.outcomes

    # Idempotent calls in flight to the lost instance were retried elsewhere.
    assert not load.failures("echo"), describe(load.failures("echo"), lost_at)
    # Non-idempotent ones may fail, but only as LostPeerError, and only those
    # that were sent before it was known to be gone.
    failed = load.failures("sleep")
    assert all(isinstance(o.error, meshkit.LostPeerError) for o in failed), describe(failed, lost_at)
    # Known lost: at once on SIGKILL (the kernel resets the connection); on
    # SIGSTOP when ZeroMQ's heartbeat times out (ping_after + dead_after = 1 s).
    detect = 0.5 if how == "SIGKILL" else 1.25
    assert all(o.started < lost_at + detect for o in failed), describe(failed, lost_at)
    assert len(failed) <= 3

    # Within about a second, well before the record's TTL (2 s), new calls
    # no longer go there: they all succeed at once, from the other instances.
    later = [o for o in outcomes if o.started >= lost_at + 1.0]
    assert len(later) > 20
    assert all(o.error is None for o in later)
    assert all(o.result != victim_id for o in later if o.label == "sleep")
    # A call that went to the hung instance and was retried after the loss
    # was detected would take about a second (dead_after + ping_after).
    slow = [(o.label, round(o.started - lost_at, 2), round(o.latency, 2)) for o in later
            if o.latency - (0.2 if o.label == "sleep" else 0.0) > 0.5]
    assert not slow, slow
    # The figures this test is about (shown with -s).
    touched = [(o.label, round(o.started - lost_at, 2), round(o.latency, 2)) for o in outcomes
               if o.started < lost_at and o.ended > lost_at
               and (o.error is not None or o.latency > 0.35)]
    detected = f"{max(o.ended - lost_at for o in failed):.2f}s" if failed else "-"
    print(f"\n{how}: {len(outcomes)} calls, {len(failed)} LostPeerError "
          f"(the last reported {detected} after the signal) "
          f"({describe(failed, lost_at) or 'none'}); calls delayed or failed by the loss "
          f"(label, start, latency) {touched}; "
          f"record still listed: {any(r.instance_id == victim_id for r in read_records(victim.settings))}")


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
