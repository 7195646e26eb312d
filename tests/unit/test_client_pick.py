"""How the client chooses an instance, without sockets.

The client's registry view is filled by hand with ``Registry.apply`` and its
pool is given a ``connect`` that makes fake peers (the seam the real ZeroMQ
peers plug into), a seeded random generator and a :class:`FakeClock`, so
nothing touches the network and the draws and the time can be replayed. A
peer's load is real: requests held in flight on it through the pool's
exchange. The last tests drive calls end to end against fake peers to check
what the chosen instance is sent and how its answers are handled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from meshkit import wire
from meshkit.client import AsyncClient
from meshkit.config import Settings
from meshkit.ejection import Health
from meshkit.errors import ClientClosedError, LostPeerError, NoInstanceError, UnknownMethodError
from meshkit.peer import CONNECTED, CONNECTING, FAILED
from meshkit.pool import RETRY_FAILED_AFTER, PeerPool
from meshkit.record import DRAINING, InstanceRecord
from meshkit.registry import Registry
from meshkit.testing import FakeClock

SEED = 20240601
HOLD = wire.CallMessage("cart", "add", wire.encode_call_body((), {}))


class FakePeer:
    """Stands in for :class:`meshkit.peer.Peer`: what the pool and the exchange use of it."""

    def __init__(self, pool: PeerPool, record: InstanceRecord, state: str = CONNECTED,
                 draining: bool = False) -> None:
        self.pool = pool
        self.record = record
        self.key = record.key
        self.state = state
        self.draining = draining
        self.lost = False
        self.failed_at = 0.0
        self.reason = ""
        self.sent: list[list[bytes]] = []
        self.recording = True
        self.on_send: Callable[[FakePeer, list[bytes]], None] | None = None

    @property
    def available(self) -> bool:
        return self.state != FAILED and not self.draining

    def send(self, frames: list[bytes], alone: bool = False) -> bool:
        if self.state == FAILED:
            return False
        if self.recording:
            self.sent.append(frames)
        if self.on_send is not None:
            asyncio.get_running_loop().call_soon(self.on_send, self, frames)
        return True

    def update(self, record: InstanceRecord) -> None:
        self.record = record
        self.draining = not record.is_up

    def mark_draining(self) -> None:
        self.draining = True
        self.pool.peer_changed(self)  # type: ignore[arg-type]

    def retire(self, reason: str) -> None:
        self.fail(False, reason)

    def fail(self, lost: bool, reason: str = "failed in a test") -> None:
        if self.state == FAILED:
            return
        self.state, self.lost, self.reason = FAILED, lost, reason
        self.failed_at = self.pool.clock.now()
        self.pool.peer_changed(self)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


class Mesh:
    """A client whose registry view and peers are set up by the test."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.settings = Settings.load(env={})
        self.registry = Registry(self.settings)
        self.clock = FakeClock()
        self.rng = random.Random(SEED)
        self.pool = PeerPool(self.settings, self.registry, ctx, clock=self.clock, rng=self.rng,
                             connect=self._connect)
        self.client = AsyncClient(self.settings, registry=self.registry, zmq_context=ctx, pool=self.pool)
        self.specs: dict[str, dict[str, Any]] = {}
        self.loads: dict[str, int] = {}
        self.connects: list[str] = []
        self.peers: dict[str, FakePeer] = {}

    def add(self, iid: str, *, service: str = "cart", up: bool = True,
            idempotent: tuple[str, ...] = (), load: int = 0, **peer: Any) -> str:
        record = InstanceRecord(service, iid, f"tcp://127.0.0.1:{5000 + len(self.specs)}", "h", 1,
                                methods=("add",), idempotent=idempotent,
                                state="up" if up else DRAINING)
        self.registry.apply(record)
        self.specs[record.key] = peer
        self.loads[record.key] = load
        return record.key

    def _connect(self, pool: PeerPool, record: InstanceRecord) -> FakePeer:
        self.connects.append(record.key)
        peer = FakePeer(pool, record, **self.specs.get(record.key, {}))
        self.peers[record.key] = peer
        self.occupy(peer, self.loads.get(record.key, 0))
        return peer

    def occupy(self, peer: FakePeer, n: int) -> None:
        """Hold ``n`` requests in flight on ``peer`` (never answered), through the real exchange."""
        peer.recording = False
        for _ in range(n):
            self.pool.exchange.start(peer, HOLD, self.clock.now() + 3600)  # type: ignore[arg-type]
        peer.recording = True

    def connect(self, *keys: str) -> None:
        for key in keys:
            record = self.registry.get(key)
            assert record is not None
            self.pool.peer_for(record)

    def peer(self, key: str) -> FakePeer:
        return self.peers[key]

    def pick(self, service: str = "cart", exclude: set[str] | None = None) -> str | None:
        peer = self.pool.pick(service, exclude or set())
        return None if peer is None else peer.key


def in_loop(test: Callable[..., None]) -> Callable[..., None]:
    """Run a synchronous test body in a running event loop (the exchange holds futures)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def body() -> None:
            test(*args, **kwargs)
        asyncio.run(body())
    return run


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield Mesh(ctx)
    finally:
        ctx.term()


@pytest.fixture
def rng(mesh: Mesh) -> random.Random:
    """The pool's seeded generator (power-of-two draws)."""
    return mesh.rng


def test_nothing_known(mesh: Mesh) -> None:
    assert mesh.pick() is None
    assert mesh.connects == []


def test_only_the_named_service(mesh: Mesh) -> None:
    mesh.add("a", service="auth")
    key = mesh.add("c")
    assert mesh.pick("cart") == key
    assert mesh.pick("auth") == "auth:a"
    assert mesh.pick("other") is None


def test_single_instance(mesh: Mesh) -> None:
    key = mesh.add("a")
    assert mesh.pick() == key
    assert mesh.pick() == key
    assert mesh.connects == [key]  # the peer is made once and reused


def test_draining_record_is_skipped_without_connecting(mesh: Mesh) -> None:
    mesh.add("old", up=False)
    new = mesh.add("new")
    assert mesh.pick() == new
    assert mesh.connects == [new]


@in_loop
def test_draining_peer_is_skipped(mesh: Mesh) -> None:
    mesh.add("a", draining=True)  # it answered "draining" before the registry said so
    b = mesh.add("b", load=50)
    assert mesh.pick() == b


@in_loop
def test_failed_peer_is_skipped(mesh: Mesh) -> None:
    mesh.add("a", state=FAILED)
    b = mesh.add("b", load=50)
    assert mesh.pick() == b


@in_loop
def test_recently_failed_instance_is_skipped(mesh: Mesh) -> None:
    a = mesh.add("a")
    b = mesh.add("b", load=50)
    mesh.connect(a)
    mesh.peer(a).fail(False)
    assert mesh.pick() == b
    assert mesh.connects == [a, b]  # the failed one was not connected again


def test_nothing_available(mesh: Mesh) -> None:
    mesh.add("a", state=FAILED)
    mesh.add("b", draining=True)
    mesh.add("c", up=False)
    d = mesh.add("d")
    mesh.connect(d)
    mesh.peer(d).fail(False)
    assert mesh.pick() is None


@in_loop
def test_connected_preferred_over_connecting(mesh: Mesh, rng: random.Random) -> None:
    connecting = [mesh.add(f"new{i}", state=CONNECTING) for i in range(3)]
    busy = mesh.add("busy", state=CONNECTED, load=1000)
    for _ in range(50):
        assert mesh.pick() == busy
    assert mesh.pick(exclude={busy}) in connecting


def test_connecting_used_when_nothing_is_connected(mesh: Mesh) -> None:
    a = mesh.add("a", state=CONNECTING)
    assert mesh.pick() == a


@in_loop
def test_two_candidates_the_less_loaded_wins(mesh: Mesh, rng: random.Random) -> None:
    mesh.add("busy", load=5)
    idle = mesh.add("idle", load=1)
    for _ in range(50):
        assert mesh.pick() == idle


@in_loop
def test_power_of_two_choices(mesh: Mesh, rng: random.Random) -> None:
    loads = {"l0": 0, "l3": 3, "l6": 6, "l9": 9}
    keys = [mesh.add(name, load=load) for name, load in loads.items()]
    mesh.pick()  # create the peers
    replica = random.Random()
    counts = dict.fromkeys(keys, 0)
    for _ in range(300):
        replica.setstate(rng.getstate())
        a, b = _two_of([mesh.peer(k) for k in keys], replica)
        expected = a if loads[a.key[5:]] <= loads[b.key[5:]] else b
        chosen = mesh.pick()
        assert chosen == expected.key
        counts[chosen] += 1
    assert counts["cart:l9"] == 0  # the most loaded never wins a draw
    assert counts["cart:l0"] > counts["cart:l3"] > counts["cart:l6"] > 0


def _two_of(items: list[FakePeer], rng: random.Random) -> tuple[FakePeer, FakePeer]:
    """The pair the pool draws from ``items`` with ``rng``: a first index, then one of the others."""
    n = len(items)
    i = int(rng.random() * n)
    if n == 2:
        return items[i], items[1 - i]
    j = int(rng.random() * (n - 1))
    return items[i], items[j + (j >= i)]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_every_ordered_pair_is_drawn_equally_often(n: int) -> None:
    """The draw is random.sample(candidates, 2)'s distribution: n * (n - 1) ordered pairs, each as likely."""
    rng = random.Random(SEED)
    items = list(range(n))
    draws = 60_000
    counts: dict[tuple[int, int], int] = {}
    for _ in range(draws):
        pair = _two_of(items, rng)  # type: ignore[arg-type]
        counts[pair] = counts.get(pair, 0) + 1  # type: ignore[index]
    pairs = n * (n - 1)
    assert sorted(counts) == [(a, b) for a in items for b in items if a != b]
    expected = draws / pairs
    # Far outside 5 standard deviations of a binomial count is a biased draw.
    assert all(abs(c - expected) < 5 * (expected * (1 - 1 / pairs)) ** 0.5 for c in counts.values()), counts


@in_loop
@pytest.mark.parametrize("n", [2, 3, 4])
def test_equal_loads_share_the_picks_evenly(mesh: Mesh, n: int) -> None:
    keys = [mesh.add(f"i{k}") for k in range(n)]
    picks = 30_000
    counts = dict.fromkeys(keys, 0)
    for _ in range(picks):
        chosen = mesh.pick()
        assert chosen is not None
        counts[chosen] += 1
    # Ties go to the first of the pair drawn, and each is first equally often.
    expected = picks / n
    assert all(abs(c - expected) < 5 * (expected * (1 - 1 / n)) ** 0.5 for c in counts.values()), counts


@in_loop
def test_three_loads_win_by_the_pairs_they_are_in(mesh: Mesh) -> None:
    """Of 3 instances the least loaded wins 4 of the 6 ordered pairs, the middle one 2, the busiest none."""
    low, mid, high = mesh.add("low", load=0), mesh.add("mid", load=1), mesh.add("high", load=2)
    picks = 30_000
    counts = {low: 0, mid: 0, high: 0}
    for _ in range(picks):
        chosen = mesh.pick()
        assert chosen is not None
        counts[chosen] += 1
    assert counts[high] == 0
    assert abs(counts[low] / picks - 2 / 3) < 0.02 and abs(counts[mid] / picks - 1 / 3) < 0.02


# -- the available peers, kept between changes ---------------------------------------


def _count_connect_checks(mesh: Mesh) -> list[str]:
    """Record every peer_for the pool makes (what building the candidate lists calls per record)."""
    seen: list[str] = []
    real = mesh.pool.peer_for

    def peer_for(record: InstanceRecord) -> Any:
        seen.append(record.key)
        return real(record)

    mesh.pool.peer_for = peer_for  # type: ignore[method-assign]
    return seen


@in_loop
def test_candidates_are_kept_while_nothing_changes(mesh: Mesh) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    seen = _count_connect_checks(mesh)
    assert mesh.pick() in (a, b)
    assert sorted(seen) == [a, b]
    for _ in range(20):
        assert mesh.pick() in (a, b)
    assert sorted(seen) == [a, b], "picks between changes reuse the lists"
    assert mesh.connects == [a, b]


@in_loop
def test_a_new_instance_in_the_registry_is_chosen(mesh: Mesh) -> None:
    busy = mesh.add("busy", load=5)
    assert mesh.pick() == busy
    idle = mesh.add("idle", load=0)  # the registry's list of cart's records is a new one
    assert mesh.pick() == idle


@in_loop
def test_an_instance_gone_from_the_registry_is_not_chosen(mesh: Mesh) -> None:
    idle, busy = mesh.add("idle", load=0), mesh.add("busy", load=5)
    assert mesh.pick() == idle
    mesh.registry.apply(None, key=idle)
    assert mesh.pick() == busy


@in_loop
def test_a_record_turned_draining_is_not_chosen(mesh: Mesh) -> None:
    idle, busy = mesh.add("idle", load=0), mesh.add("busy", load=5)
    assert mesh.pick() == idle
    record = mesh.registry.get(idle)
    assert record is not None
    mesh.registry.apply(dataclasses.replace(record, state=DRAINING))
    assert mesh.pick() == busy


@in_loop
def test_a_peer_that_answers_draining_is_not_chosen(mesh: Mesh) -> None:
    idle, busy = mesh.add("idle", load=0), mesh.add("busy", load=5)
    assert mesh.pick() == idle
    mesh.peer(idle).mark_draining()  # reported to the pool, as a Peer does
    assert mesh.pick() == busy


@in_loop
def test_a_peer_that_fails_is_not_chosen_then_comes_back_after_the_retry_interval(mesh: Mesh) -> None:
    idle, busy = mesh.add("idle", load=0), mesh.add("busy", load=5)
    assert mesh.pick() == idle
    mesh.peer(idle).fail(False)
    assert mesh.pick() == busy
    mesh.clock.advance(RETRY_FAILED_AFTER - 0.01)
    assert mesh.pick() == busy
    assert mesh.connects == [idle, busy]
    mesh.clock.advance(0.01)  # nothing else happens: the time alone brings it back
    assert mesh.pick() == idle
    assert mesh.connects == [idle, busy, idle]


@in_loop
def test_a_handshake_makes_a_peer_preferred(mesh: Mesh) -> None:
    slow = mesh.add("slow", state=CONNECTING)
    busy = mesh.add("busy", load=5)
    assert mesh.pick() == busy  # connected beats connecting, whatever the load
    peer = mesh.peer(slow)
    peer.state = CONNECTED
    mesh.pool.peer_changed(peer)  # type: ignore[arg-type]
    assert mesh.pick() == slow


@in_loop
def test_an_ejected_instance_is_not_chosen(mesh: Mesh) -> None:
    bad, good = mesh.add("bad", load=0), mesh.add("good", load=5)
    assert mesh.pick() == bad
    ejector = mesh.pool.ejector
    for _ in range(mesh.settings.eject_after_failures):
        ejector.failed(bad, "cart", [bad, good])
    assert ejector.health(bad) == Health.EJECTED
    assert mesh.pick() == good
    mesh.clock.advance(mesh.settings.eject_base_time * 2)  # past the first ejection: probing
    assert mesh.pick() == bad


@in_loop
def test_exclusions_do_not_touch_the_kept_lists(mesh: Mesh) -> None:
    idle, busy = mesh.add("idle", load=0), mesh.add("busy", load=5)
    assert mesh.pick() == idle
    assert mesh.pick(exclude={idle}) == busy
    assert mesh.pick() == idle


@in_loop
def test_a_closed_pool_picks_nothing(mesh: Mesh) -> None:
    mesh.add("a")
    assert mesh.pick() is not None
    mesh.pool.close()
    with pytest.raises(ClientClosedError):
        mesh.pick()


@in_loop
def test_load_follows_pending_requests(mesh: Mesh, rng: random.Random) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    mesh.pick()
    mesh.occupy(mesh.peer(a), 2)
    assert mesh.pool.exchange.load(mesh.peer(a)) == 2  # type: ignore[arg-type]
    assert mesh.pick() == b
    mesh.occupy(mesh.peer(b), 3)
    assert mesh.pick() == a


@in_loop
def test_exclusions(mesh: Mesh, rng: random.Random) -> None:
    a = mesh.add("a", load=0)
    b = mesh.add("b", load=10)
    c = mesh.add("c", load=20)
    assert mesh.pick(exclude={a}) == b
    assert mesh.pick(exclude={a, b}) == c
    assert mesh.pick(exclude={a, b, c}) is None


def test_excluded_instances_are_not_connected(mesh: Mesh) -> None:
    a = mesh.add("a")
    b = mesh.add("b")
    assert mesh.pick(exclude={a}) == b
    assert mesh.connects == [b]


@in_loop
def test_a_failed_instance_is_connected_again_after_the_retry_interval(mesh: Mesh) -> None:
    key = mesh.add("a")
    record = mesh.registry.get(key)
    assert record is not None
    mesh.connect(key)
    mesh.peer(key).fail(False)
    assert mesh.pool.peer_for(record) is None
    assert mesh.pool.next_retry("cart") == mesh.clock.now() + RETRY_FAILED_AFTER
    mesh.clock.advance(RETRY_FAILED_AFTER - 0.01)
    assert mesh.pool.peer_for(record) is None
    mesh.clock.advance(0.01)
    assert mesh.pool.peer_for(record) is not None
    assert mesh.connects == [key, key]


# -- one call against fake peers ---------------------------------------------------


def _answer(make: Callable[[int], list[bytes]]) -> Callable[[FakePeer, list[bytes]], None]:
    """Answer each request with the frames ``make(request_id)``, as the instance's router would."""
    def on_send(peer: FakePeer, frames: list[bytes]) -> None:
        header = wire.decode_header(frames[0])
        peer.pool.peer_message(peer, make(header.id))  # type: ignore[arg-type]
    return on_send


def _reply(value: Any) -> Callable[[FakePeer, list[bytes]], None]:
    return _answer(lambda request_id: wire.encode_reply(request_id, value))


def _error(code: str, message: str) -> Callable[[FakePeer, list[bytes]], None]:
    return _answer(lambda request_id: wire.encode_error(request_id, code, message))


def _lose(peer: FakePeer, frames: list[bytes]) -> None:
    peer.fail(True, "disconnected")


def test_the_chosen_peer_gets_a_spec_conformant_call(mesh: Mesh) -> None:
    key = mesh.add("a")

    async def main() -> Any:
        mesh.connect(key)
        mesh.peer(key).on_send = _reply({"total": 3})
        return await mesh.client.call("cart", "add", [1, 2], {"qty": 1}, timeout=2.0,
                                      meta={"conn": "c1"})

    assert asyncio.run(main()) == {"total": 3}
    (frames,) = mesh.peer(key).sent
    header = wire.decode_header(frames[0])
    assert (header.kind, header.target, header.name, header.meta) == (wire.CALL, "cart", "add",
                                                                      {"conn": "c1"})
    assert header.timeout_ms is not None and 1900 <= header.timeout_ms <= 2000
    assert header.traceparent is not None and len(header.traceparent) == 55
    assert wire.decode_call_body(frames[1], header.id) == ([1, 2], {"qty": 1})
    assert mesh.pool.exchange.in_flight == 0  # nothing left behind


def test_a_draining_answer_sends_the_call_elsewhere(mesh: Mesh, rng: random.Random) -> None:
    first = mesh.add("first", load=0)
    second = mesh.add("second", load=5)

    async def main() -> Any:
        mesh.connect(first, second)
        mesh.peer(first).on_send = _error("draining", "bye")
        mesh.peer(second).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    assert asyncio.run(main()) == "ok"
    assert mesh.peer(first).draining
    assert len(mesh.peer(first).sent) == 1 and len(mesh.peer(second).sent) == 1


def test_remote_errors_are_raised_not_retried(mesh: Mesh) -> None:
    key = mesh.add("a")

    async def main() -> Any:
        mesh.connect(key)
        mesh.peer(key).on_send = _error("unknown_method", "no")
        return await mesh.client.call("cart", "nope", timeout=2.0)

    with pytest.raises(UnknownMethodError, match="no") as info:
        asyncio.run(main())
    assert (info.value.service, info.value.method) == ("cart", "nope")
    assert len(mesh.peer(key).sent) == 1


@pytest.mark.parametrize(("idempotent", "outcome"), [(False, "lost"), (True, "retried")])
def test_lost_peer_is_retried_only_for_idempotent_methods(
    mesh: Mesh, rng: random.Random, idempotent: bool, outcome: str
) -> None:
    flags = ("add",) if idempotent else ()
    first = mesh.add("first", load=0, idempotent=flags)
    second = mesh.add("second", load=5, idempotent=flags)

    async def main() -> Any:
        mesh.connect(first, second)
        mesh.peer(first).on_send = _lose
        mesh.peer(second).on_send = _reply("ok")
        return await mesh.client.call("cart", "add", timeout=2.0)

    if outcome == "lost":
        with pytest.raises(LostPeerError):
            asyncio.run(main())
        assert mesh.peer(second).sent == []
    else:
        assert asyncio.run(main()) == "ok"


def test_no_instance_fails_at_once(mesh: Mesh) -> None:
    async def main() -> Any:
        return await mesh.client.call("cart", "add", timeout=2.0)

    with pytest.raises(NoInstanceError):
        asyncio.run(main())


# -- calling one chosen instance ---------------------------------------------------


def test_call_instance_reaches_exactly_that_instance(mesh: Mesh, rng: random.Random) -> None:
    idle = mesh.add("idle", load=0)
    busy = mesh.add("busy", load=50)

    async def main() -> Any:
        mesh.connect(idle, busy)
        for key in (idle, busy):
            mesh.peer(key).on_send = _reply(key)
        return await mesh.client.call_instance("busy", "add", 1, qty=2, timeout=2.0)

    assert asyncio.run(main()) == busy  # the load-aware choice would have been "idle"
    assert mesh.peer(idle).sent == []
    (frames,) = mesh.peer(busy).sent
    header = wire.decode_header(frames[0])
    assert (header.target, header.name) == ("cart", "add")
    assert wire.decode_call_body(frames[1], header.id) == ([1], {"qty": 2})


def test_call_instance_of_an_unknown_id_fails_without_sending(mesh: Mesh) -> None:
    mesh.add("a")

    async def main() -> Any:
        return await mesh.client.call_instance("nope", "add", timeout=2.0)

    with pytest.raises(NoInstanceError, match="nope"):
        asyncio.run(main())
    assert mesh.connects == []


def test_call_instance_does_not_fail_over_when_the_instance_is_draining(mesh: Mesh) -> None:
    first = mesh.add("first")
    second = mesh.add("second")

    async def main() -> Any:
        mesh.connect(first, second)
        mesh.peer(first).on_send = _error("draining", "bye")
        mesh.peer(second).on_send = _reply("ok")
        return await mesh.client.call_instance("first", "add", timeout=2.0)

    with pytest.raises(NoInstanceError, match="first did not take the call"):
        asyncio.run(main())
    assert len(mesh.peer(first).sent) == 1 and mesh.peer(second).sent == []


def test_call_instance_of_an_unavailable_instance_fails_at_once(mesh: Mesh) -> None:
    mesh.add("gone", state=FAILED)

    async def main() -> Any:
        return await mesh.client.call_instance("gone", "add", timeout=2.0)

    with pytest.raises(NoInstanceError, match="gone is not available"):
        asyncio.run(main())


def test_call_instance_lost_in_flight_is_not_retried_even_when_idempotent(mesh: Mesh) -> None:
    first = mesh.add("first", idempotent=("add",))
    second = mesh.add("second", idempotent=("add",))

    async def main() -> Any:
        mesh.connect(first, second)
        mesh.peer(first).on_send = _lose
        return await mesh.client.call_instance("first", "add", timeout=2.0)

    with pytest.raises(LostPeerError):
        asyncio.run(main())
    assert mesh.peer(second).sent == []
