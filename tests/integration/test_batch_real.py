"""Batches between real processes (``docs/protocol.md``, "Batches").

A meshkit client and a meshkit instance batch with each other; a peer that
never sends a batch (a bare DEALER, as a version-1 implementation without
the feature is) is never sent one, however many of its calls are in flight.
"""

from __future__ import annotations

import asyncio

import pytest
import zmq
from rawpeer import RawPeer

from meshkit import AsyncClient, Settings, wire

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
_WAIT = 10.0


def _collect(raw: RawPeer, pairs: int) -> list[list[bytes]]:
    """Messages received until ``pairs`` answers came (each message asserted to have an even frame count)."""
    got: list[list[bytes]] = []
    while sum(len(m) // 2 for m in got) < pairs:
        message = raw.recv(_WAIT)
        assert message is not None, f"{sum(len(m) // 2 for m in got)} of {pairs} answers came"
        assert message and not len(message) % 2
        got.append(message)
    return got


def test_the_record_lists_batch_and_pipelined_calls_from_a_client_all_come_back(
    start_service, mesh_settings: Settings
) -> None:
    [echo] = start_service(ECHO)
    assert wire.FEATURE_BATCH in echo.record.features

    async def main() -> None:
        client = AsyncClient(mesh_settings)
        await client.start()
        try:
            async def worker(w: int) -> list[int]:
                return [await client.call("echo", "echo", [w * 1000 + i]) for i in range(50)]
            results = await asyncio.gather(*(worker(w) for w in range(64)))
            assert results == [[w * 1000 + i for i in range(50)] for w in range(64)]
            assert await client.call("echo", "echo", ["alone"]) == "alone"
        finally:
            await client.close()
    asyncio.run(main())


def test_a_peer_that_never_batches_never_receives_a_batch(
    start_service, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    [echo] = start_service(ECHO)
    with RawPeer(zmq_ctx, echo.record.endpoint) as raw:
        for _round in range(5):
            for i in range(64):  # sent back to back: many in flight, answered in one turn of the instance
                raw.send(wire.encode_call(i, "echo", "echo", [i], {}, 5000, None, None))
            got = _collect(raw, 64)
            assert all(len(m) == 2 for m in got)  # one answer per message
            assert sorted(wire.decode_answer(m).id for m in got) == list(range(64))


def test_a_batch_is_served_pair_by_pair_and_answered_in_batches(
    start_service, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    [echo] = start_service(ECHO)
    with RawPeer(zmq_ctx, echo.record.endpoint) as raw:
        frames: list[bytes] = []
        for i in range(100, 120):
            frames += wire.encode_call(i, "echo", "echo", [i], {}, 5000, None, None)
        frames[21] = b"\xc1"  # the body of call 110 is not MessagePack: that pair alone fails
        raw.send(frames)
        got = _collect(raw, 20)
        answers = {a.id: a for m in got for a in map(wire.decode_answer, wire.pairs_of(m))}
        assert sorted(answers) == list(range(100, 120))
        assert answers[110].error is not None and answers[110].error.code == "bad_request"
        assert all(answers[i].value == i for i in range(100, 120) if i != 110)
        assert max(len(m) for m in got) > 2  # the answers came batched: the peer showed it takes batches
        raw.send(frames[:3])  # an odd frame count is one bad_request, with the first frame's id
        [message] = _collect(raw, 1)
        answer = wire.decode_answer(message)
        assert (answer.id, answer.error and answer.error.code) == (100, "bad_request")
