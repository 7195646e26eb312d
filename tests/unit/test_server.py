"""The serving side, driven in-process through a ServiceHarness: real router, real wire, fake clock."""

from __future__ import annotations

import asyncio

import pytest
from inprocess import Shop, advance_until_done, run, signalled, turns

import meshkit
from meshkit.errors import BadArgumentsError, CallTimeoutError, ConfigError, HandlerError, UnknownMethodError
from meshkit.record import DRAINING
from meshkit.testing import FakeClock, ServiceHarness


def test_an_async_and_a_plain_handler_answer_over_the_wire() -> None:
    async def test(h: ServiceHarness[Shop]) -> tuple[object, object]:
        return await h.call("echo", {"a": [1, 2]}), await h.call("double", 21)

    assert run(test) == ({"a": [1, 2]}, 42)


def test_the_endpoint_is_an_ipc_path_and_the_record_lists_the_methods() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        assert h.service.endpoint.startswith("ipc://")
        (record,) = h.registry.instances("shop")
        assert record.endpoint == h.service.endpoint
        assert set(record.methods) >= {"echo", "double", "fail", "hold"}
        assert record.topics == ("jobs.*",)

    run(test)


def test_handler_failures_and_bad_calls_come_back_as_coded_errors() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        with pytest.raises(HandlerError, match="broken"):
            await h.call("fail", "broken")
        with pytest.raises(UnknownMethodError, match="no method 'nope'"):
            await h.call("nope")
        with pytest.raises(BadArgumentsError):
            await h.call("echo", 1, 2, 3)
        assert await h.call("echo", "still serving") == "still serving"

    run(test)


def test_the_handler_sees_the_callers_metadata_and_a_deadline_on_the_servers_clock() -> None:
    async def test(h: ServiceHarness[Shop]) -> dict[str, object]:
        now = h.clock.now()
        seen = await h.call("context", timeout=3.0, meta={"tenant": "t1"})
        deadline = seen.pop("deadline")
        assert now < deadline <= now + 3.0  # fake time stands still: the whole timeout is left
        return dict(seen)

    assert run(test) == {"name": "context", "meta": {"tenant": "t1"}}


def test_a_handler_still_running_at_its_deadline_is_cancelled_when_the_clock_gets_there() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        call = asyncio.ensure_future(h.call("hold", timeout=5.0))
        await signalled(h.service.holding)
        h.clock.advance(4.0)
        await turns()
        assert not h.service.cancelled.is_set() and not call.done()
        h.clock.advance(1.0)
        with pytest.raises(CallTimeoutError, match="deadline passed while running"):
            await call
        assert h.service.cancelled.is_set()

    run(test)


def test_a_draining_server_finishes_work_in_flight_then_waits_for_quiet_on_its_clock() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        server = h.service._server
        assert server is not None
        call = asyncio.ensure_future(h.call("hold"))
        await signalled(h.service.holding)
        drain = asyncio.ensure_future(server.drain(grace=10.0, quiet=0.3))
        await turns()
        assert server.state == DRAINING and not drain.done()
        h.service.release.set()
        assert await call == "released"
        await turns()
        assert not drain.done()  # quiet period: 0.3 s of fake time since the last call
        assert await advance_until_done(h.clock, drain, 0.1) is True
        assert h.clock.now() - server.last_call >= 0.3

    run(test)


def test_a_drain_that_runs_out_of_grace_reports_it() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        server = h.service._server
        assert server is not None
        call = asyncio.ensure_future(h.call("hold"))
        await signalled(h.service.holding)
        drain = asyncio.ensure_future(server.drain(grace=2.0))
        await turns()
        assert await advance_until_done(h.clock, drain, 0.5) is False
        h.service.release.set()
        assert await call == "released"

    run(test)


def test_call_instance_reaches_the_service_through_the_real_router() -> None:
    async def test(h: ServiceHarness[Shop]) -> object:
        return await h.client.call_instance(h.service.instance_id, "double", 4, timeout=5.0)

    assert run(test) == 8


def test_framework_methods_are_reserved_and_served_while_draining() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        server = h.service._server
        assert server is not None
        server.add_framework_method("_mesh.state", lambda: server.state)
        with pytest.raises(ValueError, match=r"_mesh\."):
            server.add_framework_method("state", lambda: None)
        iid = h.service.instance_id
        assert await h.client.call_instance(iid, "_mesh.state", timeout=5.0) == "up"
        with pytest.raises(UnknownMethodError, match=r"_mesh\.other"):
            await h.client.call_instance(iid, "_mesh.other", timeout=5.0)
        server.state = DRAINING
        assert await h.client.call_instance(iid, "_mesh.state", timeout=5.0) == DRAINING

    run(test)


def test_a_service_method_in_the_reserved_namespace_is_a_config_error() -> None:
    class Bad(Shop):
        @meshkit.rpc(name="_mesh.mine")
        async def mine(self) -> None:
            return None

    async def main() -> None:
        async with ServiceHarness(Bad, clock=FakeClock()):
            pass

    with pytest.raises(ConfigError, match="reserved"):
        asyncio.run(main())
