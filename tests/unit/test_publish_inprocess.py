"""Push-publish, in-process: ACKs counted, limits kept, a dead subscriber costs at most the deadline."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from inprocess import Shop, run, signalled

from meshkit.errors import MessageTooLargeError
from meshkit.record import InstanceRecord
from meshkit.testing import ServiceHarness


def _absent_subscriber(**fields: object) -> InstanceRecord:
    """A record of an instance subscribed to ``jobs.*`` whose ipc path nobody listens on."""
    return InstanceRecord("worker", uuid.uuid4().hex[:12], f"ipc:///nonexistent/meshkit-{uuid.uuid4().hex}",
                          "h", 1, topics=("jobs.*",), **fields)  # type: ignore[arg-type]


def test_a_subscriber_runs_its_handler_and_acknowledges() -> None:
    async def test(h: ServiceHarness[Shop]) -> int:
        delivered = await h.publish("jobs.new", {"id": 1})
        await signalled(h.service.got_job)
        assert h.service.jobs == [{"id": 1}]
        return delivered

    assert run(test) == 1


def test_a_topic_nobody_subscribes_to_reaches_nobody() -> None:
    async def test(h: ServiceHarness[Shop]) -> int:
        return await h.publish("other.topic", "x")

    assert run(test) == 0


def test_pushes_from_one_publisher_are_handled_in_order() -> None:
    async def test(h: ServiceHarness[Shop]) -> list[object]:
        acks = await asyncio.gather(*(h.publish("jobs.seq", i) for i in range(30)))
        assert acks == [1] * 30
        return h.service.jobs

    assert run(test) == list(range(30))


def test_a_payload_over_the_publishers_limit_is_refused_before_sending() -> None:
    async def test(h: ServiceHarness[Shop]) -> None:
        with pytest.raises(MessageTooLargeError, match="exceeds max_message_size"):
            await h.publish("jobs.big", b"x" * 2048)
        assert h.service.jobs == []

    run(test, max_message_size=1024)


def test_a_subscriber_with_a_smaller_limit_is_skipped_and_the_others_still_get_it() -> None:
    async def test(h: ServiceHarness[Shop]) -> int:
        h.registry.add(_absent_subscriber(max_message_size=16))
        return await h.publish("jobs.mid", b"x" * 100, timeout=5.0)

    assert run(test) == 1


def test_a_dead_subscriber_delays_the_publisher_by_at_most_the_deadline() -> None:
    async def test(h: ServiceHarness[Shop]) -> tuple[int, float]:
        h.registry.add(_absent_subscriber())
        loop = asyncio.get_running_loop()
        started = loop.time()
        delivered = await h.publish("jobs.dead", "x", timeout=0.2)
        return delivered, loop.time() - started

    delivered, took = run(test)
    assert delivered == 1  # the live one acknowledged; the dead one did not
    assert took < 5.0  # bounded by the 0.2 s deadline (generous slack for a busy machine)
