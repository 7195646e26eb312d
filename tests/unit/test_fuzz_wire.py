"""Property tests of the wire decoder and of the server's handling of one message.

Any bytes and any MessagePack value, in any frame position, must give either
a well-formed answer or a counted drop: never an exception escaping, never a
long error text, never a slow decode. ``make test`` runs these with the
``ci`` profile (a few dozen examples, reproducible); ``make fuzz`` with
``HYPOTHESIS_PROFILE=fuzz`` (tens of thousands). See ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serverkit import probe_server

from meshkit import wire
from meshkit.errors import ProtocolError

pytestmark = pytest.mark.fuzz

# A tenth of the loaded profile's budget, for properties that cost ~50 ms an example.
HEAVY = settings(max_examples=max(20, settings().max_examples // 10))
ERROR_TEXT_LIMIT = 400  # characters: what an error message may be, whatever came in
SLOW = 5.0  # CPU seconds: far beyond any decode of a frame this size (a few ms), even with a GC pause
KNOWN_CODES = {"bad_request", "unsupported_version", "unknown_service", "unknown_method", "bad_arguments",
               "handler_error", "deadline_exceeded", "draining", "reply_too_large", "overloaded"}

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
            | st.text(max_size=300) | st.binary(max_size=300))


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


# Any MessagePack value as Python objects (shallow: the packer has its own depth limit) ...
_keys = st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1)
values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_keys, inner, max_size=6),
    max_leaves=30,
)
# ... and packed, now and then nested far deeper than the decoder's 1,024-level
# stack (built as bytes: an array of one item, thousands of times).
packed = values.map(_pack) | st.builds(lambda depth, leaf: b"\x91" * depth + _pack(leaf),
                                        st.integers(900, 3000), _scalars)


def _array(items: list[bytes]) -> bytes:
    """A MessagePack array of already packed items."""
    n = len(items)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(items)


ids = st.integers(0, 2**64 - 1)
kinds = st.sampled_from(list(wire.KIND_NAMES)).map(_pack) | packed
versions = st.just(b"\x01") | packed
names = st.sampled_from(["echo", "plain", "fail", "wait", "jobs.new", "nosuch", ""]).map(_pack) | packed
targets = st.sampled_from(["probe", "", "other"]).map(_pack) | packed
timeouts = (st.none() | st.integers(-5, 10_000)).map(_pack) | packed
traceparents = (st.none() | st.text(max_size=60)).map(_pack) | packed
metas = (st.none() | st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)).map(_pack) | packed


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, int, bool]:
    """``(frame, id, readable)``: a header whose first three items are ``[version, kind, id]``.

    ``readable`` says whether those three items are whole within the first
    4 KiB, so the id must be echoed whatever follows them.
    """
    id = draw(ids)
    items = [draw(versions), draw(kinds), _pack(id)]
    rest = draw(st.sampled_from(["request", "short", "any"]))
    if rest == "request":
        items += [draw(targets), draw(names), draw(timeouts), draw(traceparents), draw(metas)]
    elif rest == "any":
        items += draw(st.lists(packed, max_size=9))
    frame = _array(items)
    prefix = len(frame) - sum(map(len, items)) + sum(map(len, items[:3]))
    readable = prefix <= 4096
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(frame)))
        frame = frame[:cut] + draw(st.binary(max_size=8))  # cut, then garbage
        readable = readable and cut >= prefix
    return frame, id, readable


bodies = packed | st.binary(max_size=200) | st.builds(lambda a, k: _array([a, k]), packed, packed)
any_frame = st.binary(max_size=400) | packed | headers().map(lambda pair: pair[0]) | bodies


def _check_error(exc: ProtocolError) -> None:
    assert exc.code in ("bad_request", "unsupported_version")
    assert type(exc.id) is int and 0 <= exc.id < 2**64
    assert len(str(exc)) < ERROR_TEXT_LIMIT


def _decode(frame: bytes) -> wire.Header | ProtocolError:
    started = time.process_time()
    try:
        return wire.decode_header(frame)
    except ProtocolError as exc:
        _check_error(exc)
        return exc
    finally:
        assert time.process_time() - started < SLOW


@given(st.binary(max_size=2000))
def test_any_bytes_as_a_header(frame: bytes) -> None:
    _decode(frame)
    assert 0 <= wire.peek_id(frame) < 2**64


@given(packed)
def test_any_value_as_a_header(frame: bytes) -> None:
    _decode(frame)


@given(headers())
def test_a_readable_id_is_always_echoed(case: tuple[bytes, int, bool]) -> None:
    frame, id, readable = case
    result = _decode(frame)
    # Unless its first three items are whole, the frame is another header
    # (a cut may even leave a valid one with a different id): no claim then.
    if readable:
        assert result.id == id, result

@given(any_frame)
def test_any_body(frame: bytes) -> None:
    for decode in (wire.unpack, lambda f: wire.decode_call_body(f, 1)):
        try:
            decode(frame)
        except ProtocolError as exc:
            _check_error(exc)
    try:
        body = wire.decode_error_body(frame)
    except ProtocolError as exc:
        _check_error(exc)
    else:
        assert len(body.message) <= wire.MAX_ERROR_MESSAGE + 32 and len(body.code) <= wire.MAX_ERROR_CODE + 32


@HEAVY
@given(bodies | st.builds(lambda n: b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n, st.integers(0, 300_000)))
def test_decoding_memory_is_bounded(frame: bytes) -> None:
    # MessagePack's worst expansion is an empty array (1 byte -> a 56-byte
    # list and an 8-byte slot); past the container limit decoding stops.
    tracemalloc.start()
    try:
        try:
            wire.decode_call_body(frame, 1)
        except ProtocolError as exc:
            _check_error(exc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 80 * min(len(frame), wire.MAX_BODY_CONTAINERS) + 256 * 1024, (len(frame), peak)


@given(ids, st.text(max_size=256), st.text(min_size=1, max_size=256), st.none() | st.integers(0, 2**31),
       st.none() | st.text(max_size=60), st.none() | st.dictionaries(st.text(), st.text(), max_size=4))
def test_every_valid_request_header_round_trips(id: int, target: str, name: str, timeout_ms: int | None,
                                                 traceparent: str | None, meta: dict[str, str] | None) -> None:
    header = wire.decode_header(wire.CallMessage(target, name, b"", traceparent, meta).frames(id, timeout_ms)[0])
    assert (header.kind, header.id, header.target, header.name) == (wire.CALL, id, target, name)
    assert (header.timeout_ms, header.traceparent, header.meta) == (timeout_ms, traceparent, meta or None)


# -- the server's handling of one message, in-process --------------------------

messages = st.one_of(
    st.lists(any_frame, min_size=0, max_size=4),
    st.tuples(headers(), bodies).map(lambda case: [case[0][0], case[1]]),
    st.lists(st.tuples(headers(), bodies), min_size=2, max_size=3).map(  # a batch
        lambda cases: [frame for header, body in cases for frame in (header[0], body)]),
)


def test_server_answers_once_or_counts_a_drop() -> None:
    """Every message (each pair of a batch) gets exactly one well-formed answer, or none and one more counted drop."""
    loop = asyncio.new_event_loop()
    try:
        with probe_server(max_calls_per_peer=50) as (server, probe, pump):
            probe.gate.set()

            @given(messages)
            def one(frames: list[bytes]) -> None:
                pump.sent.clear()
                dropped = server.dropped
                loop.run_until_complete(_feed(server, [b"\x00peer", *frames]))
                pairs = wire.pairs_of(frames) if frames and not len(frames) % 2 else [frames]
                assert len(pump.sent) + server.dropped - dropped == len(pairs), frames
                for answer in pump.sent:
                    assert answer[0] == b"\x00peer" and len(answer) == 3
                    header = wire.decode_header(answer[1])
                    assert header.kind in (wire.REPLY, wire.ERROR, wire.ACK, wire.PONG)
                    if header.kind == wire.ERROR:
                        body = wire.decode_error_body(answer[2])
                        assert body.code in KNOWN_CODES
                        assert len(wire.unpack(answer[2])["message"]) <= wire.MAX_ERROR_MESSAGE + 32
                    if frames and header.kind == wire.ERROR and header.id:
                        assert any(header.id in (wire.peek_id(pair[0]), _full_id(pair[0])) for pair in pairs)

            one()
            assert server.pump is pump and server.held.count == 0
    finally:
        loop.close()


def _full_id(frame: bytes) -> int:
    try:
        return wire.decode_header(frame).id
    except ProtocolError as exc:
        return exc.id


async def _feed(server: Any, frames: list[bytes]) -> None:
    server._on_message(frames)  # must not raise: the pump would log and drop, and no answer would go
    for _ in range(3):
        await asyncio.sleep(0)
    if server._tasks:
        await asyncio.wait_for(asyncio.gather(*server._tasks), 10)
