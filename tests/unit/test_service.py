"""The Service lifecycle and its collaborators, in-process on a MemoryRegistry and a FakeClock."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq
from inprocess import Shop, advance_until_done, run, signalled, turns

from meshkit.clock import SYSTEM_CLOCK
from meshkit.config import Settings
from meshkit.metrics import Metrics
from meshkit.record import DRAINING, UP
from meshkit.testing import FakeClock, MemoryRegistry, ServiceHarness


def test_service_with_no_arguments_builds_its_own_collaborators() -> None:
    service = Shop(Settings())
    assert service.clock is SYSTEM_CLOCK
    assert service.registry.clock is SYSTEM_CLOCK
    assert service.client.registry is service.registry
    assert service.state == "new"
    asyncio.run(service.kill())  # closes what it built
    assert service.state == "stopped"


def test_given_collaborators_are_used_and_left_open() -> None:
    async def main() -> None:
        clock = FakeClock()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        executor = ThreadPoolExecutor(1)
        metrics = Metrics("", "", "shop")
        registry = MemoryRegistry(Settings(), clock=clock)
        await registry.start()
        service = Shop(Settings(), registry=registry, zmq_context=ctx, executor=executor, metrics=metrics,
                       clock=clock, bind_address="inproc://shop-collaborators")
        assert (service.registry, service.metrics, service.clock) == (registry, metrics, clock)
        await service.start()
        assert [r.key for r in registry.instances("shop")] == [service.record.key]
        await service.stop(0.0)
        assert registry.instances("shop") == []
        assert executor.submit(lambda: "still open").result(10.0) == "still open"
        assert not ctx.closed
        executor.shutdown()
        ctx.term()

    asyncio.run(main())


def test_start_registers_up_and_stop_drains_then_removes_the_record_in_order() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        key = h.service.record.key
        assert h.registry.get(key) is not None and h.registry.get(key).state == UP  # type: ignore[union-attr]
        states: list[str] = []
        h.registry.add_listener(lambda: states.append(r.state if (r := h.registry.get(key)) else "gone"))
        await h.stop(grace=0.0)
        assert states == [DRAINING, "gone"]
        assert h.service.events == ["start", "drain 0.0", "stop"]
        assert h.service.state == "stopped"

    run(test)


def test_kill_leaves_the_record_to_expire() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        key = h.service.record.key
        await h.service.kill()
        assert key in h.registry.stored

    run(test)


def test_a_periodic_task_runs_each_interval_of_the_services_clock() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        await turns()
        h.clock.advance(0.9)
        await turns()
        assert h.service.ticks == 0
        h.clock.advance(0.1)
        await signalled(h.service.ticked)
        assert h.service.ticks == 1
        h.service.ticked.clear()
        await turns()
        h.clock.advance(1.0)
        await signalled(h.service.ticked)
        assert h.service.ticks == 2

    run(test)


def test_the_heartbeat_rewrites_the_record_each_interval() -> None:
    async def test(h: ServiceHarness[Shop]) -> list[int]:
        key = h.service.record.key
        counts = [h.registry.writes[key]]
        for _ in range(3):
            await turns()
            h.clock.advance(h.settings.heartbeat_interval)
            await turns()
            counts.append(h.registry.writes[key])
        return counts

    first, *later = run(test)
    assert later == [first + 1, first + 2, first + 3]


def test_an_advertised_listener_reaches_the_record() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        key = h.service.record.key
        h.service.advertise_listener("stratum", "127.0.0.1:3333")
        for _ in range(100):
            record = h.registry.get(key)
            if record is not None and record.listeners:
                break
            await asyncio.sleep(0)
        assert h.registry.get(key).listeners == {"stratum": "127.0.0.1:3333"}  # type: ignore[union-attr]

    run(test)


def test_calls_during_a_drain_are_refused_and_work_in_flight_finishes() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        held = asyncio.ensure_future(h.call("hold"))
        await signalled(h.service.holding)
        stop = asyncio.ensure_future(h.stop(grace=5.0))
        await turns()
        assert h.service.state == "stopping"
        h.service.release.set()
        assert await held == "released"
        await turns()
        await advance_until_done(h.clock, stop, 0.1)  # through the drain's quiet period
        assert h.service.state == "stopped"

    run(test)


def test_add_subscription_after_start_is_refused() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        from meshkit.errors import ConfigError

        with pytest.raises(ConfigError, match="before start"):
            h.service.add_subscription("late", lambda payload: None)

    run(test)
