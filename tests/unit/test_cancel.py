"""Cancellation: the CANCEL message, the caller's side (exchange) and the callee's (server, RunningCalls).

The wire bytes are pinned as golden vectors (``docs/protocol.md`` §12); the
exchange is driven with a fake peer and a :class:`FakeClock`; the server runs
in-process behind its real router (:class:`ServiceHarness`).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import meshkit
from meshkit import wire
from meshkit.cancels import RunningCalls
from meshkit.config import Settings
from meshkit.context import CallContext, reset_current, set_current
from meshkit.errors import ProtocolError
from meshkit.exchange import DeadlinePassed, Exchange
from meshkit.record import InstanceRecord
from meshkit.testing import FakeClock, ServiceHarness
from meshkit.trace import TraceContext

CANCEL_HEADER = "93010802"  # [1, 8, 2]
CANCEL_BODY = "c0"  # nil
CALL = wire.CallMessage("cart", "add", wire.encode_call_body([1], {}), None, None)
_WAIT = 5.0


# -- the wire ------------------------------------------------------------------


def test_cancel_golden_vector() -> None:
    assert [f.hex() for f in wire.encode_cancel(2)] == [CANCEL_HEADER, CANCEL_BODY]
    assert wire.decode_header(bytes.fromhex(CANCEL_HEADER)) == wire.Header(1, wire.CANCEL, 2)
    assert [f.hex() for f in wire.encode_cancel(2**64 - 1)] == ["930108cfffffffffffffffff", "c0"]
    assert [f.hex() for f in wire.encode_cancel(2, "deadline")] == [CANCEL_HEADER, "a8646561646c696e65"]


def test_a_cancels_reason_is_one_of_three_and_anything_else_reads_as_cancelled() -> None:
    for reason in ("cancelled", "deadline", "closed"):
        assert wire.decode_cancel_reason(wire.encode_cancel(1, reason)[1]) == reason
    for body in (b"\xc0", wire.pack("later"), wire.pack(7), b"\xc1", wire.pack("x" * 100)):
        assert wire.decode_cancel_reason(body) == "cancelled"


def test_a_cancel_header_has_three_items_and_a_client_is_never_sent_one() -> None:
    with pytest.raises(ProtocolError, match="CANCEL header must have 3 items") as info:
        wire.decode_header(wire.pack([1, wire.CANCEL, 5, "cart", "add", None, None, None]))
    assert info.value.code == "bad_request" and info.value.id == 5
    with pytest.raises(ProtocolError, match="a client is not sent a CANCEL"):
        wire.decode_answer(wire.encode_cancel(3))


def test_the_record_says_whether_an_instance_hears_cancel() -> None:
    plain = InstanceRecord("s", "i", "tcp://h:1", "h", 1)
    assert "features" not in plain.to_json()  # a record without features is written as before
    hears = InstanceRecord("s", "i", "tcp://h:1", "h", 1, features=wire.FEATURES)
    assert InstanceRecord.from_json(hears.to_json()).features == ("cancel", "stream", "batch")
    with pytest.raises(ValueError, match="features entries"):
        InstanceRecord("s", "i", "tcp://h:1", "h", 1, features=("has space",)).check()


# -- the caller's side -------------------------------------------------------------


class FakePeer:
    def __init__(self, features: tuple[str, ...]) -> None:
        self.key = "cart:a"
        self.record = InstanceRecord("cart", "a", "tcp://127.0.0.1:1", "h", 1, features=features)
        self.draining = False
        self.sent: list[list[bytes]] = []
        self.close_linger_ms = 0

    def send(self, frames: list[bytes], alone: bool = False) -> bool:
        self.sent.append(frames)
        return True

    def kinds(self) -> list[tuple[int, int]]:
        return [(h.kind, h.id) for h in (wire.decode_header(f[0]) for f in self.sent)]

    def reasons(self) -> list[str]:
        return [wire.decode_cancel_reason(f[1]) for f in self.sent if wire.decode_header(f[0]).kind == wire.CANCEL]


def run(test: Callable[[Exchange, FakeClock], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        clock = FakeClock()
        await test(Exchange(Settings(), clock=clock, rng=random.Random(3)), clock)
    asyncio.run(main())


def test_a_withdrawn_request_is_cancelled_on_a_peer_that_hears_cancel_and_settled() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer(wire.FEATURES)
        future = exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        [(_, rid)] = peer.kinds()
        future.cancel()
        exchange.withdraw(peer, future)  # type: ignore[arg-type]
        assert peer.kinds() == [(wire.CALL, rid), (wire.CANCEL, rid)]
        assert exchange.load(peer) == 0 and exchange.cancels_sent == 1  # type: ignore[arg-type]
        assert peer.reasons() == ["cancelled"]
        exchange.receive(peer, wire.encode_error(rid, "bad_request", "x"))  # type: ignore[arg-type]
        assert exchange.dropped == 1  # what comes back for it is dropped
        clock.advance(10)
        assert peer.kinds()[-1] == (wire.CANCEL, rid)  # its timer was cancelled: no second CANCEL
    run(test)


def test_a_peer_without_the_feature_is_sent_nothing_and_keeps_counting_the_call() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer(())
        future = exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        future.cancel()
        exchange.withdraw(peer, future)  # type: ignore[arg-type]
        exchange.cancel_all()
        clock.advance(10)
        assert [k for k, _ in peer.kinds()] == [wire.CALL]
        assert exchange.load(peer) == 0  # type: ignore[arg-type]  # its deadline settled it
    run(test)


def test_a_deadline_passing_sends_a_cancel() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer(wire.FEATURES)
        future = exchange.start(peer, CALL, clock.now() + 1)  # type: ignore[arg-type]
        clock.advance(0.999)
        assert len(peer.sent) == 1
        clock.advance(0.002)
        assert [k for k, _ in peer.kinds()] == [wire.CALL, wire.CANCEL] and peer.reasons() == ["deadline"]
        with pytest.raises(DeadlinePassed):
            await future
    run(test)


def test_closing_cancels_everything_in_flight_and_lingers_to_deliver_it() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer((wire.FEATURE_CANCEL,))  # no batches: each call is sent at once (tests/unit/test_batch.py)
        for _ in range(3):
            exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
        calls = [rid for _, rid in peer.kinds()]
        exchange.cancel_all()
        assert peer.kinds()[3:] == [(wire.CANCEL, rid) for rid in calls]
        assert peer.reasons() == ["closed"] * 3
        assert peer.close_linger_ms > 0
    run(test)


def test_a_handler_cancelled_for_its_deadline_passes_the_reason_down_the_chain() -> None:
    async def test(exchange: Exchange, clock: FakeClock) -> None:
        peer = FakePeer(wire.FEATURES)
        served = CallContext("hop", "m", TraceContext.new_root(), clock.now() + 5)
        served.flag.is_set, served.flag.reason = True, "deadline"  # what a CANCEL "deadline" did upstream
        ours = CallContext("hop", "m", TraceContext.new_root(), clock.now())  # its own deadline, now
        for ctx in (served, ours, None):
            token = set_current(ctx)
            future = exchange.start(peer, CALL, clock.now() + 5)  # type: ignore[arg-type]
            future.cancel()
            exchange.withdraw(peer, future)  # type: ignore[arg-type]
            reset_current(token)
        assert peer.reasons() == ["deadline", "deadline", "cancelled"]
    run(test)


# -- the callee's table ------------------------------------------------------------


def test_running_calls_cancel_only_the_senders_own_call_and_only_once() -> None:
    calls = RunningCalls()
    a = calls.add(b"A", 1, is_async=False)
    b = calls.add(b"B", 1, is_async=False)
    assert calls.cancel(b"A", 1, "closed") and a.flag.is_set and not b.flag.is_set and a.flag.reason == "closed"
    assert not calls.cancel(b"A", 1, "cancelled") and not calls.cancel(b"A", 2, "cancelled")
    assert (calls.cancelled, calls.unmatched, len(calls)) == (1, 2, 1)
    calls.remove(b"B", 1, b)
    assert len(calls) == 0


def test_an_unstarted_task_is_flagged_not_cancelled() -> None:
    # Cancelling a task before it ran would skip the bookkeeping in its finally.
    async def main() -> None:
        calls = RunningCalls()
        entry = calls.add(b"A", 1, is_async=True)
        entry.task = asyncio.ensure_future(asyncio.sleep(0))
        calls.cancel(b"A", 1, "cancelled")
        assert entry.flag.is_set and not entry.task.cancelled()
        await entry.task
    asyncio.run(main())


# -- the server, in-process ------------------------------------------------------------


class Slow(meshkit.Service):
    name = "slow"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.thread_started = threading.Event()
        self.flag_seen = threading.Event()
        self.results: list[str] = []

    @meshkit.rpc
    async def wait(self) -> str:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "never"

    @meshkit.rpc
    def grind(self) -> str:
        self.thread_started.set()
        call = meshkit.current_call()
        assert call is not None
        end = time.monotonic() + _WAIT
        while time.monotonic() < end and not call.cancelled:
            time.sleep(0.001)
        if call.cancelled:
            self.flag_seen.set()
        return "stopped"


async def within(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), _WAIT)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what} did not happen within {_WAIT}s") from None


def test_a_cancelled_caller_cancels_the_async_handler() -> None:
    async def main() -> None:
        async with ServiceHarness(Slow) as h:
            task = asyncio.create_task(h.call("wait", timeout=_WAIT))
            await within(h.service.started, "the handler starting")
            task.cancel()
            await within(h.service.cancelled, "the handler's cancellation")
            server = h.service._server
            assert server is not None
            for _ in range(100):  # its release runs as the task ends
                if not server.inflight:
                    break
                await asyncio.sleep(0.01)
            assert server.inflight == 0 and len(server.running) == 0 and server.running.cancelled == 1
            # The observer saw it end: nothing left in flight, one call failed "cancelled".
            observer = h.service.observer
            counter = observer.stats.counter(False, "wait")
            assert not observer.active and counter.in_flight == 0
            assert counter.calls == 1 and counter.errors == {"cancelled": 1}
    asyncio.run(main())


def test_wait_for_cancels_the_async_handler() -> None:
    async def main() -> None:
        async with ServiceHarness(Slow) as h:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(h.call("wait", timeout=_WAIT), 0.2)
            await within(h.service.cancelled, "the handler's cancellation")
    asyncio.run(main())


def test_a_plain_handler_sees_the_flag_and_its_answer_is_not_sent() -> None:
    async def main() -> None:
        async with ServiceHarness(Slow) as h:
            task = asyncio.create_task(h.call("grind", timeout=_WAIT))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, h.service.thread_started.wait, _WAIT)
            task.cancel()
            assert await loop.run_in_executor(None, h.service.flag_seen.wait, _WAIT)
            server = h.service._server
            assert server is not None
            for _ in range(100):
                if not server.inflight:
                    break
                await asyncio.sleep(0.01)
            assert server.inflight == 0
            assert h.client.exchange.dropped == 0  # nothing came back for the cancelled call
    asyncio.run(main())


class Gated(meshkit.Service):
    """A plain handler one call at a time: a second call waits at its gate (or for the one thread)."""

    name = "gated"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.ran: list[str] = []

    @meshkit.rpc(max_concurrency=1)
    def hold(self, tag: str) -> str:
        self.ran.append(tag)
        self.entered.set()
        self.release.wait(_WAIT)
        return tag

    @meshkit.rpc
    def free(self, tag: str) -> str:
        return self.hold(tag)


async def until(check: Callable[[], bool], what: str, wait: float = 2.0) -> None:
    """Poll ``check`` on the loop until it holds, or fail naming ``what`` (a positive signal, not a sleep)."""
    end = time.monotonic() + wait
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {wait}s")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("waits_for", ["gate", "thread"])
def test_a_cancel_ends_a_plain_calls_wait_before_its_thread_runs_it(waits_for: str) -> None:
    # "gate": the second call waits at the method's concurrency gate, in its task;
    # "thread": the only handler thread is busy, so it waits in the executor's queue.
    # Either way a CANCEL ends the wait at once, and the handler never runs it.
    method = "hold" if waits_for == "gate" else "free"
    settings = Settings(handler_threads=1) if waits_for == "thread" else Settings()

    async def main() -> None:
        async with ServiceHarness(Gated, settings=settings) as h:
            try:
                await _cancel_a_waiting_plain_call(h, method, waits_for)
            finally:
                h.service.release.set()  # never leave the handler's thread waiting
    asyncio.run(main())


async def _cancel_a_waiting_plain_call(h: ServiceHarness[Gated], method: str, waits_for: str) -> None:
    server = h.service._server
    assert server is not None
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(h.call(method, "first", timeout=_WAIT))
    assert await loop.run_in_executor(None, h.service.entered.wait, _WAIT)
    second = asyncio.create_task(h.call(method, "second", timeout=_WAIT))
    await until(lambda: server.inflight == 2, "the second call's admission")
    if waits_for == "gate":
        await until(lambda: server.limits.methods["hold"].queued == 1, "the second call queueing")
    second.cancel()
    await until(lambda: server.inflight == 1 and len(server.running) == 1, "the cancelled wait ending")
    counter = h.service.observer.stats.counter(False, method)
    assert counter.errors == {"cancelled": 1}
    h.service.release.set()
    assert await first == "first"
    await until(lambda: server.inflight == 0, "the first call ending")
    assert h.service.ran == ["first"]  # the cancelled call never ran
    assert h.client.exchange.dropped == 0
