"""Request correlation: every request started is settled exactly once, in the one place that knows ids.

Driven without sockets: a fake peer records what it is sent, answers are
fed to :meth:`Exchange.receive` as the peer's socket would, and deadlines
move on a :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from meshkit import wire
from meshkit.config import Settings
from meshkit.exchange import DeadlinePassed, Exchange, LostInFlight, NotDelivered
from meshkit.peer import Peer
from meshkit.record import InstanceRecord
from meshkit.testing import FakeClock

T = TypeVar("T")

CALL = wire.CallMessage("cart", "add", wire.encode_call_body([1], {}), None, None)


class FakePeer:
    """What the exchange uses of a peer: send, its key, and the two verbs."""

    def __init__(self, key: str = "cart:a", accepts: bool = True, features: tuple[str, ...] = ()) -> None:
        self.key = key
        self.record = InstanceRecord("cart", "a", "tcp://127.0.0.1:1", "h", 1, features=features)
        self.accepts = accepts
        self.draining = False
        self.retired: list[str] = []
        self.sent: list[list[bytes]] = []

    def send(self, frames: list[bytes], alone: bool = False) -> bool:
        if self.accepts:
            self.sent.append(frames)
        return self.accepts

    def mark_draining(self) -> None:
        self.draining = True

    def retire(self, reason: str) -> None:
        self.retired.append(reason)

    def last_id(self) -> int:
        return wire.decode_header(self.sent[-1][0]).id


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.idle: list[FakePeer] = []
        self.exchange = Exchange(Settings(), clock=self.clock, rng=random.Random(7),
                                 on_idle=lambda peer: self.idle.append(peer))  # type: ignore[arg-type]

    def start(self, peer: FakePeer, deadline: float = 5.0) -> asyncio.Future[wire.Answer]:
        return self.exchange.start(peer, CALL, self.clock.now() + deadline)  # type: ignore[arg-type]

    def answer(self, peer: FakePeer, frames: list[bytes]) -> None:
        self.exchange.receive(peer, frames)  # type: ignore[arg-type]

    def load(self, peer: FakePeer) -> int:
        return self.exchange.load(peer)  # type: ignore[arg-type]


def run(test: Callable[[Rig], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        return await test(Rig())
    return asyncio.run(main())


def test_a_reply_settles_its_request_and_leaves_nothing_behind() -> None:
    async def test(rig: Rig) -> wire.Answer:
        peer = FakePeer()
        future = rig.start(peer)
        header = wire.decode_header(peer.sent[0][0])
        assert (header.kind, header.target, header.name, header.timeout_ms) == (wire.CALL, "cart", "add", 5000)
        assert rig.load(peer) == 1 and rig.clock.pending == 1
        rig.answer(peer, wire.encode_reply(header.id, "done"))
        assert rig.load(peer) == 0 and rig.exchange.in_flight == 0
        assert rig.clock.pending == 0  # the deadline timer is gone
        return await future

    answer = run(test)
    assert (answer.kind, answer.value, answer.error) == (wire.REPLY, "done", None)


def test_ids_are_distinct_and_start_from_the_injected_generator() -> None:
    async def test(rig: Rig) -> list[int]:
        peer = FakePeer()
        for _ in range(3):
            rig.start(peer)
        return [wire.decode_header(frames[0]).id for frames in peer.sent]

    ids = run(test)
    first = random.Random(7).getrandbits(32) + 1
    assert ids == [first, first + 1, first + 2]


def test_an_answer_reaches_only_the_request_it_names_on_the_peer_it_was_sent_to() -> None:
    async def test(rig: Rig) -> None:
        a, b = FakePeer("cart:a"), FakePeer("cart:b")
        on_a, on_b = rig.start(a), rig.start(b)
        # b answers with a's id: it matches nothing of b's, and a's request keeps waiting.
        rig.answer(b, wire.encode_reply(a.last_id(), "wrong peer"))
        assert not on_a.done() and not on_b.done()
        assert rig.exchange.dropped == 1
        rig.answer(a, wire.encode_reply(a.last_id(), "right"))
        assert (await on_a).value == "right"
        rig.answer(a, wire.encode_reply(a.last_id(), "again"))  # a duplicate: dropped, counted
        assert rig.exchange.dropped == 2
        on_b.cancel()

    run(test)


def test_the_deadline_settles_it_once_and_a_late_answer_is_dropped() -> None:
    async def test(rig: Rig) -> None:
        peer = FakePeer()
        future = rig.start(peer, deadline=2.0)
        rig.clock.advance(1.999)
        assert not future.done()
        rig.clock.advance(0.001)
        with pytest.raises(DeadlinePassed):
            await future
        assert rig.load(peer) == 0
        rig.answer(peer, wire.encode_reply(peer.last_id(), "late"))
        assert rig.exchange.dropped == 1

    run(test)


def test_nothing_is_sent_past_the_deadline_or_to_a_peer_that_cannot_take_it() -> None:
    async def test(rig: Rig) -> None:
        peer = FakePeer()
        with pytest.raises(DeadlinePassed):
            rig.start(peer, deadline=0.0)
        assert peer.sent == []
        full = FakePeer(accepts=False)
        with pytest.raises(NotDelivered):
            rig.start(full)
        assert rig.load(full) == 0 and rig.clock.pending == 0

    run(test)


def test_timeout_ms_is_the_time_left_rounded_down() -> None:
    async def test(rig: Rig) -> int | None:
        peer = FakePeer()
        rig.start(peer, deadline=1.2345)
        return wire.decode_header(peer.sent[0][0]).timeout_ms

    assert run(test) == 1234


def test_draining_means_not_delivered_and_marks_the_peer() -> None:
    async def test(rig: Rig) -> None:
        peer = FakePeer()
        future = rig.start(peer)
        rig.answer(peer, wire.encode_error(peer.last_id(), "draining", "bye"))
        with pytest.raises(NotDelivered):
            await future
        assert peer.draining and peer.retired == []
        assert rig.idle == []  # it settled the last request before it was marked draining

    run(test)


def test_unknown_service_means_not_delivered_and_retires_the_peer() -> None:
    async def test(rig: Rig) -> None:
        peer = FakePeer()
        future = rig.start(peer)
        rig.answer(peer, wire.encode_error(peer.last_id(), "unknown_service", "this is 'auth'"))
        with pytest.raises(NotDelivered):
            await future
        assert len(peer.retired) == 1 and "serves another service" in peer.retired[0]

    run(test)


def test_other_errors_are_answers_for_the_caller() -> None:
    async def test(rig: Rig) -> wire.Answer:
        peer = FakePeer()
        future = rig.start(peer)
        rig.answer(peer, wire.encode_error(peer.last_id(), "handler_error", "boom", "ValueError"))
        return await future

    answer = run(test)
    assert answer.kind == wire.ERROR and answer.error == wire.ErrorBody("handler_error", "boom", "ValueError")


@pytest.mark.parametrize(("lost", "outcome"), [(True, LostInFlight), (False, NotDelivered)])
def test_a_failed_peer_settles_everything_in_flight_on_it(lost: bool, outcome: type[Exception]) -> None:
    async def test(rig: Rig) -> None:
        peer, other = FakePeer("cart:a"), FakePeer("cart:b")
        futures = [rig.start(peer) for _ in range(3)]
        elsewhere = rig.start(other)
        rig.exchange.abandon(peer, lost=lost)  # type: ignore[arg-type]
        for future in futures:
            with pytest.raises(outcome):
                await future
        assert rig.load(peer) == 0 and rig.load(other) == 1 and not elsewhere.done()
        assert rig.clock.pending == 1  # only the other request's timer is left
        elsewhere.cancel()

    run(test)


def test_an_unreadable_answer_is_dropped_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def test(rig: Rig) -> None:
        peer = FakePeer()
        future = rig.start(peer)
        with caplog.at_level(logging.WARNING, "meshkit.exchange"):
            rig.answer(peer, [b"\xc1", b"\xc0"])
            rig.answer(peer, [wire.encode_reply(peer.last_id(), 1)[0]])  # one frame
        assert rig.exchange.dropped == 2 and not future.done()
        future.cancel()

    run(test)
    assert "dropping an unreadable answer from cart:a" in caplog.text


def test_a_cancelled_waiter_keeps_counting_until_its_answer_comes() -> None:
    async def test(rig: Rig) -> None:
        peer = FakePeer()
        peer.draining = True
        future = rig.start(peer)
        future.cancel()
        assert rig.load(peer) == 1  # the instance is still working on it
        rig.answer(peer, wire.encode_reply(peer.last_id(), "unwanted"))
        assert rig.load(peer) == 0 and rig.exchange.dropped == 0
        assert rig.idle == [peer]  # a draining peer with nothing in flight may be closed

    run(test)


def test_the_exchange_types_its_peers_as_peers() -> None:
    # The fake above stands in for exactly what the exchange uses of a Peer.
    used = {"send", "key", "mark_draining", "retire", "draining"}
    assert used <= set(dir(Peer)) | {"key", "draining"}


def test_forgetting_a_closed_peer_never_loses_a_request_in_flight() -> None:
    async def test(rig: Rig) -> None:
        idle, busy = FakePeer("cart:a"), FakePeer("cart:b")
        done = rig.start(idle)
        rig.answer(idle, wire.encode_reply(idle.last_id(), 1))
        await done
        waiting = rig.start(busy)
        rig.exchange.forget(idle)  # type: ignore[arg-type]
        rig.exchange.forget(busy)  # type: ignore[arg-type]
        assert rig.load(busy) == 1
        rig.exchange.abandon(busy, lost=True)  # type: ignore[arg-type]
        with pytest.raises(LostInFlight):
            await waiting

    run(test)
