"""The panel's per-tab send queue: bounded in bytes, drops counted and reported, never grows."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshkit.panel.feed import SendQueue


def test_frames_come_out_in_order() -> None:
    queue = SendQueue(100)
    assert queue.put("a") and queue.put("b")
    assert [queue.take(), queue.take(), queue.take()] == ["a", "b", None]


def test_a_full_queue_drops_counts_and_reports_once_before_the_next_frame() -> None:
    queue = SendQueue(10)
    assert queue.put("12345")
    assert queue.put("678")
    assert not queue.put("abc")  # 8 + 3 > 10
    assert not queue.put("é" * 2)  # bytes, not characters: 4 bytes do not fit in the 2 left
    assert queue.queued_bytes == 8
    assert json.loads(queue.take() or "") == {"type": "dropped", "count": 2}
    assert queue.take() == "12345"
    assert queue.put("xyz")  # room again
    assert [queue.take(), queue.take(), queue.take()] == ["678", "xyz", None]
    assert queue.dropped_total == 2


def test_a_frame_larger_than_the_whole_bound_is_dropped() -> None:
    queue = SendQueue(4)
    assert not queue.put("too long")
    assert len(queue) == 0 and queue.queued_bytes == 0


def test_memory_stays_bounded_under_a_flood() -> None:
    queue = SendQueue(1000)
    for i in range(10_000):
        queue.put(f"frame {i:05d}")
    assert queue.queued_bytes <= 1000
    assert len(queue) == 1000 // len("frame 00000")


def test_get_waits_for_a_frame_and_ends_when_closed() -> None:
    async def main() -> list[str | None]:
        queue = SendQueue(100)
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        assert not getter.done()
        queue.put("hello")
        first = await asyncio.wait_for(getter, 1)
        closer = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.close()
        return [first, await asyncio.wait_for(closer, 1)]

    assert asyncio.run(main()) == ["hello", None]


def test_a_closed_queue_refuses_frames() -> None:
    queue = SendQueue(100)
    queue.close()
    assert not queue.put("late")


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SendQueue(0)


def test_a_frame_of_a_kind_replaces_the_waiting_one_of_that_kind() -> None:
    queue = SendQueue(100)
    queue.put("state-1", "state")
    queue.put("event-1")
    queue.put("state-2", "state")
    queue.put("event-2")
    assert queue.queued_bytes == len("event-1state-2event-2")
    assert [queue.take() for _ in range(4)] == ["event-1", "state-2", "event-2", None]
