"""Batches: several ``[header, body]`` pairs in one ZeroMQ message (``docs/protocol.md``, "Batches").

The packing and splitting are pure functions of :mod:`meshkit.wire`; the
server is driven in-process with a recording pump (``serverkit``), the
transport over a real ``inproc`` ROUTER/DEALER pair, and the caller's side
(:class:`Exchange`) with a fake peer and a :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import zmq
from serverkit import call, probe_server

from meshkit import wire
from meshkit.config import Settings
from meshkit.exchange import DeadlinePassed, Exchange, NotDelivered
from meshkit.record import InstanceRecord
from meshkit.testing import FakeClock
from meshkit.transport import SocketPump

BATCH_FRAMES = "93010201 2a 93010502 c0"  # pack_batches([encode_reply(1, 42), encode_ack(2)])
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
PEER = b"\x00peer"
CALL = wire.CallMessage("cart", "add", wire.encode_call_body([1], {}), None, None)


# -- the wire ------------------------------------------------------------------


def test_batch_golden_vector_is_its_pairs_in_order_and_printed_in_the_doc() -> None:
    [batch] = wire.pack_batches([wire.encode_reply(1, 42), wire.encode_ack(2)])
    assert " ".join(f.hex() for f in batch) == BATCH_FRAMES
    assert " ".join(f"`{f}`" for f in BATCH_FRAMES.split()) in PROTOCOL_DOC.read_text()
    assert [wire.decode_answer(pair).id for pair in wire.pairs_of(batch)] == [1, 2]
    assert wire.FEATURE_BATCH == "batch" and wire.FEATURE_BATCH in wire.FEATURES
    assert (wire.MAX_BATCH_PAIRS, wire.MAX_BATCH_BYTES) == (64, 64 * 1024)


def test_a_lone_message_is_returned_as_it_was_and_never_extended() -> None:
    only = wire.encode_reply(1, 1)
    assert wire.pack_batches([only]) == [only] and wire.pack_batches([only])[0] is only
    first, second = wire.encode_reply(1, 1), wire.encode_reply(2, 2)
    [batch] = wire.pack_batches([first, second])
    assert len(first) == 2 and batch == first + second  # the caller's list is left alone


def test_batches_hold_at_most_64_pairs_in_order() -> None:
    messages = [wire.encode_reply(i, i) for i in range(130)]
    batches = wire.pack_batches(messages)
    assert [len(b) // 2 for b in batches] == [64, 64, 2]
    assert [wire.decode_header(p[0]).id for b in batches for p in wire.pairs_of(b)] == list(range(130))


def test_batches_hold_at_most_64_kib_and_a_big_pair_goes_alone() -> None:
    def reply(id: int, size: int) -> list[bytes]:
        return wire.encode_reply(id, b"x" * size)

    batches = wire.pack_batches([reply(i, 20_000) for i in range(7)])
    assert [len(b) // 2 for b in batches] == [3, 3, 1]  # a fourth would pass 64 KiB
    assert all(sum(map(len, b)) <= wire.MAX_BATCH_BYTES for b in batches)
    big = reply(9, wire.MAX_BATCH_BYTES)
    batches = wire.pack_batches([reply(1, 10), big, reply(2, 10), reply(3, 10)])
    assert [[wire.decode_header(p[0]).id for p in wire.pairs_of(b)] for b in batches] == [[1], [9], [2, 3]]
    assert batches[1] is big


def test_a_routers_batches_keep_the_identity_once_in_front() -> None:
    messages = [[PEER, *wire.encode_reply(i, i)] for i in range(3)]
    [batch] = wire.pack_batches(messages, routing=1)
    assert batch[0] == PEER and len(batch) == 7
    assert [wire.decode_answer(p).id for p in wire.pairs_of(batch[1:])] == [0, 1, 2]


# -- the server ----------------------------------------------------------------


def _answers(sent: list[list[bytes]]) -> dict[int, tuple[int, str]]:
    """id -> (kind, error code or "") of every answer recorded, each message one pair."""
    out = {}
    for message in sent:
        assert message[0] == PEER and len(message) == 3
        answer = wire.decode_answer(message[1:])
        out[answer.id] = (answer.kind, answer.error.code if answer.error else "")
    return out


async def _serve(server: Any, frames: list[bytes]) -> None:
    server._on_message(frames)
    for _ in range(3):
        await asyncio.sleep(0)
    if server._tasks:
        await asyncio.wait_for(asyncio.gather(*server._tasks), 10)


def test_each_pair_of_a_batch_is_served_and_a_malformed_one_gets_its_own_answer() -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            bad_version = wire.pack([2, wire.CALL, 5, "probe", "echo", None, None, None])
            frames = [PEER, *call(1, "echo", "a"), b"\xc1", b"", *call(3, "echo", "c"),
                      bad_version, b"\x92\x90\x80", *call(4, "nope")]
            await _serve(server, frames)
            assert _answers(pump.sent) == {
                1: (wire.REPLY, ""), 0: (wire.ERROR, "bad_request"), 3: (wire.REPLY, ""),
                5: (wire.ERROR, "unsupported_version"), 4: (wire.ERROR, "unknown_method")}
            assert len(pump.joined) == 5  # the sender batches, so its answers may go batched
    asyncio.run(main())


def test_a_message_of_an_odd_frame_count_is_one_bad_request() -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            await _serve(server, [PEER, *call(1, "echo", "a"), *call(2, "echo", "b")[:1]])
            assert _answers(pump.sent) == {1: (wire.ERROR, "bad_request")}
            assert "expected 2 frames, got 3" in wire.unpack(pump.sent[0][2])["message"]
    asyncio.run(main())


def test_pairs_past_64_in_one_batch_are_refused_each_with_its_id() -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            frames = [PEER]
            for i in range(1, 67):
                frames += call(i, "echo", i)
            await _serve(server, frames)
            answers = _answers(pump.sent)
            assert all(answers[i] == (wire.REPLY, "") for i in range(1, 65))
            assert answers[65] == answers[66] == (wire.ERROR, "bad_request")
            assert len(answers) == 66
    asyncio.run(main())


def test_a_peer_that_never_batched_gets_no_answer_queued_for_a_batch() -> None:
    async def main() -> None:
        with probe_server() as (server, _probe, pump):
            other = b"\x00other"
            await _serve(server, [other, *call(1, "echo", 1), *call(2, "echo", 2)])  # it batches
            for i in range(3, 6):  # ours sends one pair per message, several in flight
                server._on_message([PEER, *call(i, "echo", i)])
            await _serve(server, [PEER, *wire.encode_ping(9)])
            assert {m[0] for m in pump.joined} == {other}
            assert sorted(wire.decode_header(m[1]).id for m in pump.sent if m[0] == PEER) == [3, 4, 5, 9]
    asyncio.run(main())


# -- the transport -------------------------------------------------------------


def test_a_routers_joined_answers_leave_as_one_message_and_the_others_one_each() -> None:
    async def main() -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router, batcher, single = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        try:
            router.bind("inproc://batch")
            batcher.connect("inproc://batch")
            single.connect("inproc://batch")
            identities: list[bytes] = []
            for sock in (batcher, single):
                sock.send_multipart(wire.encode_ping(1))
                identities.append(router.recv_multipart()[0])
            pump = SocketPump(router, lambda frames: None,
                              packer=lambda messages: wire.pack_batches(messages, routing=1))
            pump.start()
            for i in range(3):
                pump.send_soon([identities[0], *wire.encode_reply(i, i)], join=True)
                pump.send_soon([identities[1], *wire.encode_reply(i, i)])
            await asyncio.sleep(0)  # the end of the turn: flush
            pump.stop()
            assert batcher.poll(1000) and len(batcher.recv_multipart()) == 6
            assert not batcher.poll(0)
            got = [single.recv_multipart() for _ in range(3)]
            assert [wire.decode_answer(m).id for m in got] == [0, 1, 2]
        finally:
            for sock in (router, batcher, single):
                sock.close(linger=0)
            ctx.term()
    asyncio.run(main())


def test_a_lone_answer_goes_at_once_even_to_a_batching_peer() -> None:
    class Recording(SocketPump):
        def __init__(self) -> None:
            super().__init__(zmq.Context.instance().socket(zmq.ROUTER), lambda frames: None,
                             packer=lambda messages: wire.pack_batches(messages, routing=1))
            self.now: list[list[bytes]] = []

        def send(self, frames: list[bytes], alone: bool = False) -> bool:
            self.now.append(frames)
            return True

    pump = Recording()
    try:
        pump.send_soon([PEER, *wire.encode_reply(1, 1)], batch=False, join=True)
        assert pump.now == [[PEER, *wire.encode_reply(1, 1)]]  # sent within send_soon, not at the turn's end
    finally:
        pump.sock.close(linger=0)


def _ids_sent(sent: list[list[bytes]]) -> list[int]:
    """The answer ids in ``sent`` (ROUTER messages, batched or not), in the order they left."""
    return [wire.decode_answer(pair).id for frames in sent for pair in wire.pairs_of(frames[1:])]


def test_one_peers_answers_keep_their_order_when_it_starts_or_stops_taking_batches() -> None:
    """A stream's ITEMs and its REPLY must arrive in order, whichever queue each answer was put in."""
    class Recording(SocketPump):
        def __init__(self) -> None:
            super().__init__(zmq.Context.instance().socket(zmq.ROUTER), lambda frames: None,
                             packer=lambda messages: wire.pack_batches(messages, routing=1), join_at=3)
            self.sent: list[list[bytes]] = []

        def send(self, frames: list[bytes], alone: bool = False) -> bool:
            self.sent.append(frames)
            return True

    async def main() -> None:
        pump = Recording()
        pump.start()
        try:
            # Forgotten as a batcher mid-turn (the server's bounded memory): joined, then not.
            pump.send_soon([PEER, *wire.encode_reply(1, 1)], join=True)
            pump.send_soon([PEER, *wire.encode_reply(2, 2)], join=True)
            pump.send_soon([PEER, *wire.encode_reply(3, 3)])
            await asyncio.sleep(0)
            assert _ids_sent(pump.sent) == [1, 2, 3]
            pump.sent.clear()
            # Becoming one mid-turn: not joined, then joined until a full batch leaves at once.
            pump.send_soon([PEER, *wire.encode_reply(4, 4)])
            for i in (5, 6, 7):
                pump.send_soon([PEER, *wire.encode_reply(i, i)], join=True)
            await asyncio.sleep(0)
            assert _ids_sent(pump.sent) == [4, 5, 6, 7]
        finally:
            pump.stop()
            pump.sock.close(linger=0)
    asyncio.run(main())


# -- the caller's side -----------------------------------------------------------


class FakePeer:
    def __init__(self, features: tuple[str, ...] = wire.FEATURES, takes: bool = True) -> None:
        self.key = "cart:a"
        self.record = InstanceRecord("cart", "a", "tcp://127.0.0.1:1", "h", 1, features=features)
        self.draining = False
        self.takes = takes
        self.sent: list[list[bytes]] = []  # each message as it was sent
        self.close_linger_ms = 0

    def send(self, frames: list[bytes], alone: bool = False) -> bool:
        if not self.takes:
            return False
        self.sent.append(frames)
        return True

    def messages(self) -> list[list[tuple[int, int]]]:
        """Each message sent, as the (kind, id) of its pairs."""
        return [[(h.kind, h.id) for h in (wire.decode_header(p[0]) for p in wire.pairs_of(m))] for m in self.sent]


def run(test: Callable[[Exchange, FakeClock], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        clock = FakeClock()
        await test(Exchange(Settings(), clock=clock, rng=random.Random(3)), clock)
    asyncio.run(main())


async def _turn() -> None:
    await asyncio.sleep(0)


def test_a_lone_call_goes_at_once_and_the_turns_others_as_one_batch() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer()
        futures = [exchange.start(peer, CALL, clock.now() + 5) for _ in range(4)]  # type: ignore[arg-type]
        assert len(peer.sent) == 1  # the first, alone on the peer: at once
        await _turn()
        first, batch = peer.messages()
        ids = [rid for _, rid in first + batch]
        assert len(first) == 1 and batch == [(wire.CALL, rid) for rid in ids[1:]]
        answers = [wire.encode_reply(rid, rid) for rid in reversed(ids)]
        [joined] = wire.pack_batches(answers)
        exchange.receive(peer, joined)  # type: ignore[arg-type]
        assert [f.result().value for f in futures] == ids
        assert exchange.load(peer) == 0 and exchange.dropped == 0  # type: ignore[arg-type]
    run(test)


def test_an_instance_without_the_feature_is_never_sent_a_batch() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer((wire.FEATURE_CANCEL, wire.FEATURE_STREAM))
        for _ in range(5):
            exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        assert len(peer.sent) == 5  # each at once, as before batches
        await _turn()
        assert all(len(m) == 2 for m in peer.sent) and len(peer.sent) == 5
    run(test)


def test_a_queued_batch_the_peer_refuses_settles_each_call_not_delivered() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer()
        first = exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        queued = [exchange.start(peer, CALL, clock.now() + 5) for _ in range(2)]  # type: ignore[arg-type]
        peer.takes = False  # its queue filled up meanwhile
        await _turn()
        for future in queued:
            with pytest.raises(NotDelivered):
                future.result()
        assert not first.done() and exchange.load(peer) == 1  # type: ignore[arg-type]
    run(test)


def test_a_queued_call_withdrawn_or_expired_before_the_turns_end_is_never_sent() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer()
        exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        withdrawn = exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        expiring = exchange.start(peer, CALL, clock.now() + 0.001)  # type: ignore[arg-type]
        kept = exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        withdrawn.cancel()
        exchange.withdraw(peer, withdrawn)  # type: ignore[arg-type]
        clock.advance(0.01)
        with pytest.raises(DeadlinePassed):
            expiring.result()
        await _turn()
        _first, batch = peer.messages()
        assert len(batch) == 1 and batch[0][0] == wire.CALL  # only ``kept``; and no CANCEL for the others
        assert exchange.cancels_sent == 0 and not kept.done()
        assert exchange.load(peer) == 2  # type: ignore[arg-type]
    run(test)


def test_closing_cancels_what_was_sent_and_sends_nothing_queued() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer()
        for _ in range(3):
            exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        [[(_, sent)]] = peer.messages()
        exchange.cancel_all()
        await _turn()
        assert peer.messages()[1:] == [[(wire.CANCEL, sent)]]
    run(test)


def test_a_batched_answer_with_an_unreadable_pair_settles_the_others() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer()
        futures = [exchange.start(peer, CALL, clock.now() + 5) for _ in range(2)]  # type: ignore[arg-type]
        await _turn()
        ids = [rid for m in peer.messages() for _, rid in m]
        exchange.receive(peer, [*wire.encode_reply(ids[0], "a"), b"\xc1", b"",  # type: ignore[arg-type]
                                *wire.encode_reply(ids[1], "b")])
        assert [f.result().value for f in futures] == ["a", "b"] and exchange.dropped == 1
        exchange.receive(peer, [*wire.encode_reply(ids[0], "a"), b""])  # type: ignore[arg-type]  # odd: dropped
        assert exchange.dropped == 2
    run(test)
