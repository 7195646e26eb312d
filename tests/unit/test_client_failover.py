"""How the client fails over, ejects and budgets its retries, against fake peers (no sockets).

The fake peers, registry view and pool seams are those of ``test_client_pick``;
time is a :class:`~meshkit.testing.FakeClock` and the draws are seeded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_client_pick import FakePeer, Mesh, _answer, _error, _lose, _reply
from test_client_pick import mesh as mesh  # the fixture

from meshkit import wire
from meshkit.config import Settings
from meshkit.ejection import Health
from meshkit.errors import HandlerError, LostPeerError, NoInstanceError, RemoteError
from meshkit.peer import CONNECTED, CONNECTING
from meshkit.retrybudget import RetryBudget


def no_budget(mesh: Mesh) -> None:
    mesh.pool.retry_budget = RetryBudget(Settings.load(env={}, retry_ratio=0.0, retry_min_per_second=0.0),
                                         clock=mesh.clock)


def test_overloaded_is_sent_elsewhere_within_the_budget(mesh: Mesh) -> None:
    busy = mesh.add("busy", load=0)
    idle = mesh.add("idle", load=5)  # more of this caller's own load: "busy" is chosen first

    async def main() -> Any:
        mesh.connect(busy, idle)
        mesh.peer(busy).on_send = _error("overloaded", "too many calls")
        mesh.peer(idle).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    assert asyncio.run(main()) == "ok"
    assert len(mesh.peer(busy).sent) == 1 and len(mesh.peer(idle).sent) == 1
    assert mesh.pool.retry_budget.retried == 1
    assert mesh.pool.ejector.health(busy) == Health.HEALTHY and mesh.pool.ejector.snapshot() == []


def test_overloaded_with_the_budget_spent_is_the_callers_error(mesh: Mesh) -> None:
    busy = mesh.add("busy", load=0)
    idle = mesh.add("idle", load=5)
    no_budget(mesh)

    async def main() -> Any:
        mesh.connect(busy, idle)
        mesh.peer(busy).on_send = _error("overloaded", "too many calls")
        mesh.peer(idle).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    with pytest.raises(RemoteError, match="too many calls") as info:
        asyncio.run(main())
    assert "overloaded" in str(info.value)
    assert mesh.peer(idle).sent == []
    assert mesh.pool.retry_budget.refused == 1


def test_an_idempotent_call_lost_in_flight_is_not_retried_without_budget(mesh: Mesh) -> None:
    first = mesh.add("first", load=0, idempotent=("add",))
    second = mesh.add("second", load=5, idempotent=("add",))
    no_budget(mesh)

    async def main() -> Any:
        mesh.connect(first, second)
        mesh.peer(first).on_send = _lose
        mesh.peer(second).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    with pytest.raises(LostPeerError, match="retry budget"):
        asyncio.run(main())
    assert mesh.peer(second).sent == []


def test_an_instance_that_always_fails_is_ejected_then_probed(mesh: Mesh) -> None:
    bad = mesh.add("bad")
    good = mesh.add("good")

    async def calls(n: int) -> int:
        errors = 0
        for _ in range(n):
            try:
                await mesh.client.call("cart", "add", timeout=2.0)
            except HandlerError:
                errors += 1
        return errors

    async def main() -> list[int]:
        mesh.connect(bad, good)
        mesh.peer(bad).on_send = _error("handler_error", "boom")
        mesh.peer(good).on_send = _reply("ok")
        first = await calls(200)
        mesh.clock.advance(1.21)  # past the first ejection (1 s, jitter 20%)
        probed = await calls(50)
        mesh.clock.advance(1.0)  # inside the second ejection (2 s +- 20%)
        still = await calls(50)
        return [first, probed, still]

    assert asyncio.run(main()) == [7, 1, 0]
    (state,) = mesh.pool.ejector.snapshot()
    assert (state.key, state.health, state.ejections) == (bad, Health.EJECTED, 2)
    assert 1.6 - 1.0 <= state.ejected_for <= 2.4 - 1.0


def test_fresh_client_waits_for_the_first_handshake_not_a_dead_instance(mesh: Mesh) -> None:
    dead = mesh.add("dead", state=CONNECTING)
    live = mesh.add("live", state=CONNECTING)

    async def main() -> Any:
        mesh.connect(dead, live)

        def handshake() -> None:
            peer: FakePeer = mesh.peer(live)
            peer.state = CONNECTED
            mesh.pool.peer_changed(peer)  # type: ignore[arg-type]

        mesh.peer(live).on_send = _reply("ok")
        asyncio.get_running_loop().call_soon(handshake)
        return await mesh.client.call("cart", "add", timeout=2.0)

    assert asyncio.run(main()) == "ok"
    assert mesh.peer(dead).sent == [], "nothing queued behind a handshake that never completes"
    assert len(mesh.peer(live).sent) == 1


def test_a_lone_connecting_instance_is_sent_the_call_at_once(mesh: Mesh) -> None:
    only = mesh.add("only", state=CONNECTING)

    async def main() -> Any:
        mesh.connect(only)
        mesh.peer(only).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    assert asyncio.run(main()) == "ok"


def test_choice_uses_the_load_the_instances_report(mesh: Mesh) -> None:
    busy = mesh.add("busy")
    idle = mesh.add("idle", load=2)  # this caller's own requests: more on "idle"
    pongs = {busy: ["up", 40], idle: ["up", 2]}  # but "busy" holds 40 calls of other callers

    async def main() -> tuple[int, int]:
        mesh.connect(busy, idle)
        for key in (busy, idle):
            mesh.peer(key).on_send = _answer(lambda rid, key=key: wire.encode_pong(rid, *pongs[key]))
        mesh.pool.start()
        before = [mesh.pick() for _ in range(20)]
        mesh.clock.advance(mesh.settings.load_report_interval)  # the pool PINGs both
        await asyncio.sleep(0)  # the fake peers answer on the next turn
        await asyncio.sleep(0)
        assert (mesh.pool.reported_load(busy), mesh.pool.reported_load(idle)) == (40, 2)
        after = [mesh.pick() for _ in range(20)]
        mesh.pool.close()
        return before.count(busy), after.count(busy)

    before, after = asyncio.run(main())
    assert before == 20, "by its own counts alone the caller prefers busy"
    assert after == 0


def test_a_pong_saying_draining_marks_the_peer(mesh: Mesh) -> None:
    key = mesh.add("a")

    async def main() -> None:
        mesh.connect(key)
        mesh.peer(key).on_send = _answer(lambda rid: wire.encode_pong(rid, "draining", 0))
        mesh.pool.start()
        mesh.clock.advance(mesh.settings.load_report_interval)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        mesh.pool.close()

    asyncio.run(main())
    assert mesh.peer(key).draining


def test_timeouts_count_against_the_instance_only_once_sent(mesh: Mesh) -> None:
    key = mesh.add("slow")
    other = mesh.add("other")

    async def main() -> None:
        mesh.connect(key, other)
        for peer in (key, other):
            mesh.peer(peer).on_send = None  # never answers
        call = asyncio.ensure_future(mesh.client.call("cart", "add", timeout=1.0))
        await asyncio.sleep(0)
        mesh.clock.advance(1.0)
        with pytest.raises(TimeoutError):
            await call
        with pytest.raises(TimeoutError):
            await mesh.client.call("cart", "add", timeout=0.0)  # late before anything was sent

    asyncio.run(main())
    (state,) = mesh.pool.ejector.snapshot()
    assert state.failures == 1


def _refuse(peer: FakePeer, frames: list[bytes]) -> None:
    peer.fail(False, "connection refused")  # never reached: the request settles NotDelivered


def test_a_waiting_call_with_the_budget_spent_waits_for_an_instance_not_fails(mesh: Mesh) -> None:
    dead = mesh.add("dead")
    no_budget(mesh)

    async def main() -> Any:
        mesh.connect(dead)
        mesh.peer(dead).on_send = _refuse
        call = asyncio.ensure_future(mesh.client.call("cart", "add", timeout=2.0, wait=True))
        for _ in range(10):  # the attempt on "dead", its refusal, the budget's answer
            await asyncio.sleep(0)
        assert mesh.peer(dead).sent and not call.done(), "it waits: nothing ran it, its deadline is ahead"
        fresh = mesh.add("fresh")  # the instance it waits for appears
        mesh.connect(fresh)
        mesh.peer(fresh).on_send = _reply("ok")
        mesh.pool.notify()
        return await call

    assert asyncio.run(main()) == "ok"
    assert mesh.pool.retry_budget.refused == 1 and mesh.pool.retry_budget.retried == 0


def test_a_call_that_does_not_wait_fails_at_once_when_the_budget_is_spent(mesh: Mesh) -> None:
    dead = mesh.add("dead")
    other = mesh.add("other", load=5)
    no_budget(mesh)

    async def main() -> Any:
        mesh.connect(dead, other)
        mesh.peer(dead).on_send = _refuse
        mesh.peer(other).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    with pytest.raises(NoInstanceError, match="retry budget"):
        asyncio.run(main())
    assert mesh.peer(other).sent == []


def test_a_peer_lost_with_only_its_load_report_ping_out_is_not_a_warning(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """The WARNING says requests may be lost; a load-report PING lost with its peer is no request of anyone."""
    key = mesh.add("a")

    async def main() -> None:
        mesh.connect(key)
        mesh.peer(key).on_send = lambda peer, frames: None  # the PING stays out
        mesh.pool.start()
        mesh.clock.advance(mesh.settings.load_report_interval)
        assert mesh.pool.exchange.load(mesh.peer(key)) == 1  # type: ignore[arg-type]
        with caplog.at_level("INFO", logger="meshkit.pool"):
            mesh.peer(key).fail(True, "disconnected")
        mesh.pool.close()

    asyncio.run(main())
    [record] = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert record.levelname == "INFO", record.getMessage()
    assert "(0 in flight, and a load-report PING)" in record.getMessage()
