"""How the client chooses an instance, without sockets.

The client's registry view is filled by hand with ``Registry.apply`` and its
pool's ``peer_for`` is replaced by a factory of fake peers, so nothing touches
the network. The last tests drive one call end to end against a fake peer to
check what the chosen instance is sent and how its answers are handled.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from meshkit import pool as pool_module
from meshkit import wire
from meshkit.client import AsyncClient
from meshkit.config import Settings
from meshkit.errors import LostPeerError, NoInstanceError, UnknownMethodError
from meshkit.peer import CONNECTED, CONNECTING, FAILED
from meshkit.pool import PeerPool
from meshkit.record import DRAINING, InstanceRecord
from meshkit.registry import Registry


class FakePeer:
    """Stands in for :class:`meshkit.peer.Peer`: the attributes ``PeerPool.pick`` reads."""

    def __init__(self, record: InstanceRecord, state: str = CONNECTED, draining: bool = False,
                 load: int = 0) -> None:
        self.record = record
        self.key = record.key
        self.state = state
        self.draining = draining
        self.pending: dict[int, Any] = {-i: None for i in range(1, load + 1)}
        self.sent: list[list[bytes]] = []
        self.on_send: Callable[[FakePeer, list[bytes]], None] | None = None

    @property
    def available(self) -> bool:
        return self.state != FAILED and not self.draining

    @property
    def load(self) -> int:
        return len(self.pending)

    def send(self, frames: list[bytes]) -> bool:
        if self.state == FAILED:
            return False
        self.sent.append(frames)
        if self.on_send is not None:
            asyncio.get_running_loop().call_soon(self.on_send, self, frames)
        return True


class Mesh:
    """A client whose registry view and peers are set up by the test."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.settings = Settings.load(env={})
        self.registry = Registry(self.settings)
        self.client = AsyncClient(self.settings, registry=self.registry, zmq_context=ctx)
        self.specs: dict[str, dict[str, Any]] = {}
        self.refused: set[str] = set()
        self.connects: list[str] = []
        self.pool = self.client.pool
        self.pool.peer_for = self._peer_for  # type: ignore[method-assign, assignment]

    def add(self, iid: str, *, service: str = "cart", up: bool = True,
            idempotent: tuple[str, ...] = (), **peer: Any) -> str:
        record = InstanceRecord(service, iid, f"tcp://127.0.0.1:{5000 + len(self.specs)}", "h", 1,
                                methods=("add",), idempotent=idempotent,
                                state="up" if up else DRAINING)
        self.registry.apply(record)
        self.specs[record.key] = peer
        return record.key

    def _peer_for(self, record: InstanceRecord) -> FakePeer | None:
        existing = self.pool._peers.get(record.key)
        if existing is not None:
            return existing  # type: ignore[return-value]
        self.connects.append(record.key)
        if record.key in self.refused:
            return None  # what the real peer_for does for a recently failed instance
        peer = FakePeer(record, **self.specs.get(record.key, {}))
        self.pool._peers[record.key] = peer  # type: ignore[assignment]
        return peer

    def peer(self, key: str) -> FakePeer:
        return self.pool._peers[key]  # type: ignore[return-value]

    def pick(self, service: str = "cart", exclude: set[str] | None = None) -> str | None:
        peer = self.pool.pick(service, exclude or set())
        return None if peer is None else peer.key


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield Mesh(ctx)
    finally:
        ctx.term()


@pytest.fixture
def rng(monkeypatch: pytest.MonkeyPatch) -> random.Random:
    """A seeded ``random`` for the client module (power-of-two draws)."""
    seeded = random.Random(20240601)
    monkeypatch.setattr(pool_module, "random", seeded)
    return seeded


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


def test_draining_peer_is_skipped(mesh: Mesh) -> None:
    mesh.add("a", draining=True)  # it answered "draining" before the registry said so
    b = mesh.add("b", load=50)
    assert mesh.pick() == b


def test_failed_peer_is_skipped(mesh: Mesh) -> None:
    mesh.add("a", state=FAILED)
    b = mesh.add("b", load=50)
    assert mesh.pick() == b


def test_recently_failed_instance_is_skipped(mesh: Mesh) -> None:
    a = mesh.add("a")
    b = mesh.add("b", load=50)
    mesh.refused.add(a)
    assert mesh.pick() == b


def test_nothing_available(mesh: Mesh) -> None:
    mesh.add("a", state=FAILED)
    mesh.add("b", draining=True)
    mesh.add("c", up=False)
    mesh.refused.add(mesh.add("d"))
    assert mesh.pick() is None


def test_connected_preferred_over_connecting(mesh: Mesh, rng: random.Random) -> None:
    connecting = [mesh.add(f"new{i}", state=CONNECTING) for i in range(3)]
    busy = mesh.add("busy", state=CONNECTED, load=1000)
    for _ in range(50):
        assert mesh.pick() == busy
    assert mesh.pick(exclude={busy}) in connecting


def test_connecting_used_when_nothing_is_connected(mesh: Mesh) -> None:
    a = mesh.add("a", state=CONNECTING)
    assert mesh.pick() == a


def test_two_candidates_the_less_loaded_wins(mesh: Mesh, rng: random.Random) -> None:
    mesh.add("busy", load=5)
    idle = mesh.add("idle", load=1)
    for _ in range(50):
        assert mesh.pick() == idle


def test_power_of_two_choices(mesh: Mesh, rng: random.Random) -> None:
    loads = {"l0": 0, "l3": 3, "l6": 6, "l9": 9}
    keys = [mesh.add(name, load=load) for name, load in loads.items()]
    mesh.pick()  # create the peers
    replica = random.Random()
    counts = dict.fromkeys(keys, 0)
    for _ in range(300):
        replica.setstate(rng.getstate())
        a, b = replica.sample([mesh.peer(k) for k in keys], 2)
        expected = a if a.load <= b.load else b
        chosen = mesh.pick()
        assert chosen == expected.key
        counts[chosen] += 1
    assert counts["cart:l9"] == 0  # the most loaded never wins a draw
    assert counts["cart:l0"] > counts["cart:l3"] > counts["cart:l6"] > 0


def test_load_follows_pending_requests(mesh: Mesh, rng: random.Random) -> None:
    a, b = mesh.add("a"), mesh.add("b")
    mesh.pick()
    mesh.peer(a).pending.update({1: None, 2: None})
    assert mesh.pick() == b
    mesh.peer(b).pending.update({3: None, 4: None, 5: None})
    assert mesh.pick() == a


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


def test_real_connect_waits_after_a_failure(mesh: Mesh) -> None:
    # The real peer_for, for an instance that failed just now: no peer, no socket.
    key = mesh.add("a")
    record = mesh.registry.get(key)
    assert record is not None
    mesh.pool._failed_at[key] = time.monotonic()
    assert PeerPool.peer_for(mesh.pool, record) is None
    assert mesh.pool._peers == {}


# -- one call against fake peers ---------------------------------------------------


def _answer(kind: int, body: bytes) -> Callable[[FakePeer, list[bytes]], None]:
    def on_send(peer: FakePeer, frames: list[bytes]) -> None:
        header = wire.decode_header(frames[0])
        peer.pending[header.id].on_answer(kind, body)
    return on_send


def test_the_chosen_peer_gets_a_spec_conformant_call(mesh: Mesh) -> None:
    key = mesh.add("a")

    async def main() -> Any:
        mesh.pool.peer_for(mesh.registry.get(key))  # type: ignore[arg-type]
        mesh.peer(key).on_send = _answer(wire.REPLY, wire.pack({"total": 3}))
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
    assert mesh.peer(key).pending == {}  # nothing left behind


def test_a_draining_answer_sends_the_call_elsewhere(mesh: Mesh, rng: random.Random) -> None:
    first = mesh.add("first", load=0)
    second = mesh.add("second", load=5)

    async def main() -> Any:
        mesh.pick()
        mesh.peer(first).on_send = _answer(wire.ERROR, wire.encode_error(0, "draining", "bye")[1])
        mesh.peer(second).on_send = _answer(wire.REPLY, wire.pack("ok"))
        return await mesh.client.call("cart", "add", timeout=2.0)

    assert asyncio.run(main()) == "ok"
    assert mesh.peer(first).draining
    assert len(mesh.peer(first).sent) == 1 and len(mesh.peer(second).sent) == 1


def test_remote_errors_are_raised_not_retried(mesh: Mesh) -> None:
    key = mesh.add("a")

    async def main() -> Any:
        mesh.pick()
        error = wire.encode_error(0, "unknown_method", "no")[1]
        mesh.peer(key).on_send = _answer(wire.ERROR, error)
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

    def lose(peer: FakePeer, frames: list[bytes]) -> None:
        peer.state = FAILED
        for item in list(peer.pending.values()):
            if item is not None:
                item.on_fail(True)

    async def main() -> Any:
        mesh.pick()
        mesh.peer(first).on_send = lose
        mesh.peer(second).on_send = _answer(wire.REPLY, wire.pack("ok"))
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
        for key in (idle, busy):
            mesh.pool.peer_for(mesh.registry.get(key))  # type: ignore[arg-type]
            mesh.peer(key).on_send = _answer(wire.REPLY, wire.pack(key))
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
        for key in (first, second):
            mesh.pool.peer_for(mesh.registry.get(key))  # type: ignore[arg-type]
        mesh.peer(first).on_send = _answer(wire.ERROR, wire.encode_error(0, "draining", "bye")[1])
        mesh.peer(second).on_send = _answer(wire.REPLY, wire.pack("ok"))
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

    def lose(peer: FakePeer, frames: list[bytes]) -> None:
        peer.state = FAILED
        for item in list(peer.pending.values()):
            if item is not None:
                item.on_fail(True)

    async def main() -> Any:
        for key in (first, second):
            mesh.pool.peer_for(mesh.registry.get(key))  # type: ignore[arg-type]
        mesh.peer(first).on_send = lose
        return await mesh.client.call_instance("first", "add", timeout=2.0)

    with pytest.raises(LostPeerError):
        asyncio.run(main())
    assert mesh.peer(second).sent == []
