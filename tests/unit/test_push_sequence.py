"""Push streams are numbered, so a subscriber can tell what it missed (``docs/protocol.md`` §9).

The arithmetic is driven directly (:class:`PushStreams`, :class:`PushSequences`);
then a subscriber behind its real router sees ``current_call().push_seq`` and
``.gap`` for publishes from the harness's client, one of them lost on the way.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import meshkit
from meshkit import publish, wire
from meshkit.sequence import SEQ_KEY, PushSequences, PushStreams
from meshkit.testing import ServiceHarness


class Peer:
    """Stands for a peer: streams are kept per peer object, weakly."""


MESSAGE = wire.PushMessage("jobs.new", wire.encode_push_body({"n": 1}), None, {"conn": "c1"})


def meta_of(frames: list[bytes]) -> dict[str, str]:
    meta = wire.decode_header(frames[0]).meta
    assert meta is not None
    return meta


def test_each_peer_gets_its_own_stream_numbered_from_one() -> None:
    streams = PushStreams(random.Random(1))
    a, b = Peer(), Peer()
    stamps = [meta_of(streams.stamp(p, MESSAGE).frames(7, 100))[SEQ_KEY] for p in (a, a, b, a)]
    tokens = [s.split(":")[0] for s in stamps]
    assert [s.split(":")[1] for s in stamps] == ["1", "2", "1", "3"]
    assert tokens[0] == tokens[1] == tokens[3] != tokens[2] and len(tokens[0]) == 16


def test_a_stamped_push_keeps_the_message_and_its_meta() -> None:
    frames = PushStreams(random.Random(1)).stamp(Peer(), MESSAGE).frames(7, 100)
    header = wire.decode_header(frames[0])
    assert (header.kind, header.id, header.name, header.timeout_ms) == (wire.PUSH, 7, "jobs.new", 100)
    assert header.meta is not None and header.meta["conn"] == "c1"
    assert frames[1] == MESSAGE.body


def seq(token: str, n: int, **extra: str) -> dict[str, str]:
    return {SEQ_KEY: f"{token}:{n}", **extra}


T1, T2 = "0" * 16, "f" * 16


def test_gaps_are_the_numbers_skipped_per_stream() -> None:
    s = PushSequences()
    assert s.observe(seq(T1, 1)) == ({}, 1, 0)
    assert s.observe(seq(T1, 2, conn="c")) == ({"conn": "c"}, 2, 0)  # the key is taken out
    assert s.observe(seq(T1, 5))[1:] == (5, 2)
    assert s.observe(seq(T2, 3))[1:] == (3, 2)  # first seen at 3: 1 and 2 were missed
    assert s.observe(seq(T1, 6))[1:] == (6, 0)
    assert s.observe(seq(T1, 4))[1:] == (4, 0)  # never negative, and the last stays 6
    assert s.observe(seq(T1, 7))[1:] == (7, 0)
    assert s.missed == 4


def test_unnumbered_and_malformed_stamps_are_outside_any_stream() -> None:
    s = PushSequences()
    assert s.observe(None) == ({}, None, 0)
    assert s.observe({"conn": "c"}) == ({"conn": "c"}, None, 0)
    for bad in ("x", "short:1", f"{T1}:", f"{T1}:-1", f"{T1}:\u00b2", f"{T1}:" + "9" * 20):
        assert s.observe({SEQ_KEY: bad}) == ({}, None, 0)
    assert s.missed == 0


def test_the_stream_table_is_bounded_forgetting_the_least_recent() -> None:
    s = PushSequences(max_streams=2)
    a, b, c = "a" * 16, "b" * 16, "c" * 16
    s.observe(seq(a, 1))
    s.observe(seq(b, 1))
    s.observe(seq(a, 2))  # a is now the most recent
    s.observe(seq(c, 1))  # b is forgotten
    assert s.observe(seq(a, 3))[2] == 0
    assert s.observe(seq(b, 2))[2] == 1  # seen afresh: 1 counts as missed


class Listener(meshkit.Service):
    name = "listener"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int | None, int, bool]] = []

    @meshkit.subscribe("jobs.new")
    async def on_job(self, payload: Any) -> None:
        call = meshkit.current_call()
        assert call is not None
        self.seen.append((call.push_seq, call.gap, SEQ_KEY in call.meta))


def test_a_subscriber_sees_its_stream_numbers_and_a_missed_push() -> None:
    async def main() -> None:
        async with ServiceHarness(Listener) as h:
            assert await h.publish("jobs.new", 1) == 1
            assert await h.publish("jobs.new", 2) == 1
            peer = h.client.pool.peer_for(h.service.record)
            assert peer is not None
            publish.STREAMS.stamp(peer, MESSAGE)  # a number used up, never sent: a push lost on the way
            assert await h.publish("jobs.new", 3) == 1
            assert h.service.seen == [(1, 0, False), (2, 0, False), (4, 1, False)]
            assert h.service._server is not None and h.service._server.pushes.sequences.missed == 1
    asyncio.run(main())
