"""The wire protocol: golden byte vectors, header validation, body decoding.

The vectors below are also printed in ``docs/protocol.md``. They were
computed once and are hard-coded on purpose: any change to the encoding makes
these tests fail, and such a change must bump the protocol version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from meshkit import wire
from meshkit.errors import ProtocolError

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _hex(frames: list[bytes]) -> list[str]:
    return [f.hex() for f in frames]


def _header(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)  # type: ignore[no-any-return]


# -- golden vectors ---------------------------------------------------------

CALL_HEADER = (
    "98010101a46563686fa46563686fcd1388d937"
    "30302d34626639326633353737623334646136613363653932396430653065343733362d"
    "303066303637616130626139303262372d3031"
    "81a4636f6e6ea26331"
)
CALL_BODY = "92912a80"
CALL_MIN_HEADER = "98010107a463617274a5746f74616cc0c0c0"
CALL_MIN_BODY = "929081a475736572a27531"
REPLY_HEADER = "93010201"
REPLY_BODY = "2a"
ERROR_HEADER = "93010301"
ERROR_BODY = (
    "83a4636f6465ad68616e646c65725f6572726f72a76d657373616765a4626f6f6d"
    "a474797065aa56616c75654572726f72"
)
ERROR_PLAIN_HEADER = "93010309"
ERROR_PLAIN_BODY = "82a4636f6465ae756e6b6e6f776e5f6d6574686f64a76d657373616765a26e6f"
PUSH_HEADER = "98010402a0a86a6f62732e6e6577cd03e8c0c0"
PUSH_BODY = "81a668656967687464"
ACK_HEADER = "93010502"
PING_HEADER = "93010603"
PONG_HEADER = "93010703"
PONG_BODY = "92a2757000"
NIL = "c0"
BIG_ID_REPLY_HEADER = "930102cfffffffffffffffff"
BIG_ID_REPLY_BODY = "c4020001"


PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_vectors_are_printed_in_the_protocol_doc() -> None:
    doc = PROTOCOL_DOC.read_text()
    vectors = {name: value for name, value in globals().items()
               if name.endswith(("_HEADER", "_BODY")) and isinstance(value, str)}
    assert len(vectors) == 18
    vectors["NIL"] = NIL
    for name, value in vectors.items():
        assert f"`{value}`" in doc, f"{name} is missing from docs/protocol.md"


def test_constants() -> None:
    assert wire.VERSION == 1
    assert wire.SUPPORTED_VERSIONS == (1,)
    kinds = (wire.CALL, wire.REPLY, wire.ERROR, wire.PUSH, wire.ACK, wire.PING, wire.PONG, wire.CANCEL,
             wire.ITEM, wire.CREDIT)
    assert kinds == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert wire.KIND_NAMES == {
        1: "CALL", 2: "REPLY", 3: "ERROR", 4: "PUSH", 5: "ACK", 6: "PING", 7: "PONG", 8: "CANCEL",
        9: "ITEM", 10: "CREDIT",
    }


def test_call_vector() -> None:
    frames = wire.encode_call(1, "echo", "echo", [42], {}, 5000, TRACEPARENT, {"conn": "c1"})
    assert _hex(frames) == [CALL_HEADER, CALL_BODY]
    header = wire.decode_header(bytes.fromhex(CALL_HEADER))
    assert header == wire.Header(1, wire.CALL, 1, "echo", "echo", 5000, TRACEPARENT, {"conn": "c1"})
    assert header.kind in (wire.CALL, wire.PUSH)
    assert wire.decode_call_body(bytes.fromhex(CALL_BODY), 1) == ([42], {})


def test_minimal_call_vector_with_kwargs_and_nils() -> None:
    frames = wire.encode_call(7, "cart", "total", [], {"user": "u1"}, None, None, {})
    assert _hex(frames) == [CALL_MIN_HEADER, CALL_MIN_BODY]  # empty meta is sent as nil
    header = wire.decode_header(bytes.fromhex(CALL_MIN_HEADER))
    assert header == wire.Header(1, wire.CALL, 7, "cart", "total", None, None, None)
    assert wire.decode_call_body(bytes.fromhex(CALL_MIN_BODY), 7) == ([], {"user": "u1"})


def test_call_accepts_any_sequence_and_mapping() -> None:
    frames = wire.encode_call(1, "echo", "echo", (42,), {}, 5000, TRACEPARENT, {"conn": "c1"})
    assert _hex(frames) == [CALL_HEADER, CALL_BODY]


def test_reply_vector() -> None:
    assert _hex(wire.encode_reply(1, 42)) == [REPLY_HEADER, REPLY_BODY]
    header = wire.decode_header(bytes.fromhex(REPLY_HEADER))
    assert header == wire.Header(1, wire.REPLY, 1)
    assert header.kind not in (wire.CALL, wire.PUSH)
    assert wire.unpack(bytes.fromhex(REPLY_BODY)) == 42


def test_reply_with_largest_id_and_binary_result() -> None:
    frames = wire.encode_reply(2**64 - 1, b"\x00\x01")
    assert _hex(frames) == [BIG_ID_REPLY_HEADER, BIG_ID_REPLY_BODY]
    assert wire.decode_header(frames[0]).id == 2**64 - 1
    assert wire.unpack(frames[1]) == b"\x00\x01"


def test_error_vector_with_type() -> None:
    frames = wire.encode_error(1, "handler_error", "boom", "ValueError")
    assert _hex(frames) == [ERROR_HEADER, ERROR_BODY]
    assert wire.decode_header(frames[0]) == wire.Header(1, wire.ERROR, 1)
    expected = wire.ErrorBody("handler_error", "boom", "ValueError")
    assert wire.decode_error_body(frames[1]) == expected


def test_error_vector_without_type() -> None:
    frames = wire.encode_error(9, "unknown_method", "no")
    assert _hex(frames) == [ERROR_PLAIN_HEADER, ERROR_PLAIN_BODY]
    assert wire.unpack(frames[1]) == {"code": "unknown_method", "message": "no"}
    assert wire.decode_error_body(frames[1]) == wire.ErrorBody("unknown_method", "no")


def test_error_with_traceback() -> None:
    frames = wire.encode_error(4, "handler_error", "boom", "KeyError", "Traceback ...")
    assert wire.unpack(frames[1]) == {
        "code": "handler_error",
        "message": "boom",
        "type": "KeyError",
        "traceback": "Traceback ...",
    }
    assert wire.decode_error_body(frames[1]).traceback == "Traceback ..."


def test_push_vector() -> None:
    frames = wire.encode_push(2, "jobs.new", {"height": 100}, 1000, None, None)
    assert _hex(frames) == [PUSH_HEADER, PUSH_BODY]
    header = wire.decode_header(bytes.fromhex(PUSH_HEADER))
    assert header == wire.Header(1, wire.PUSH, 2, "", "jobs.new", 1000, None, None)
    assert header.kind in (wire.CALL, wire.PUSH)
    assert wire.unpack(bytes.fromhex(PUSH_BODY)) == {"height": 100}


def test_push_split_encoding_matches() -> None:
    message = wire.PushMessage("jobs.new", wire.encode_push_body({"height": 100}))
    assert _hex(message.frames(2, 1000)) == [PUSH_HEADER, PUSH_BODY]


def test_the_call_message_production_sends_is_the_golden_vector() -> None:
    message = wire.CallMessage("echo", "echo", wire.encode_call_body([42], {}), TRACEPARENT, {"conn": "c1"})
    assert _hex(message.frames(1, 5000)) == [CALL_HEADER, CALL_BODY]
    assert wire.timeout_ms(5.0009) == 5000 and wire.timeout_ms(0.0004) == 0 and wire.timeout_ms(-1) == 0


def test_ack_ping_pong_vectors() -> None:
    assert _hex(wire.encode_ack(2)) == [ACK_HEADER, NIL]
    assert _hex(wire.encode_ping(3)) == [PING_HEADER, NIL]
    assert _hex(wire.encode_pong(3, "up", 0)) == [PONG_HEADER, PONG_BODY]
    assert wire.decode_header(bytes.fromhex(ACK_HEADER)) == wire.Header(1, wire.ACK, 2)
    assert wire.decode_header(bytes.fromhex(PING_HEADER)) == wire.Header(1, wire.PING, 3)
    assert wire.decode_header(bytes.fromhex(PONG_HEADER)) == wire.Header(1, wire.PONG, 3)
    assert wire.unpack(bytes.fromhex(NIL)) is None
    assert wire.unpack(bytes.fromhex(PONG_BODY)) == ["up", 0]


def test_answers_decode_with_their_bodies() -> None:
    reply = wire.decode_answer([bytes.fromhex(REPLY_HEADER), bytes.fromhex(REPLY_BODY)])
    assert reply == wire.Answer(1, wire.REPLY, 42)
    error = wire.decode_answer([bytes.fromhex(ERROR_HEADER), bytes.fromhex(ERROR_BODY)])
    assert error == wire.Answer(1, wire.ERROR, None, wire.ErrorBody("handler_error", "boom", "ValueError"))
    assert wire.decode_answer([bytes.fromhex(ACK_HEADER), bytes.fromhex(NIL)]) == wire.Answer(2, wire.ACK)
    assert wire.decode_answer([bytes.fromhex(PONG_HEADER), bytes.fromhex(PONG_BODY)]).value == ["up", 0]


def test_an_unreadable_answer_body_fails_its_request_as_bad_request() -> None:
    answer = wire.decode_answer([bytes.fromhex(REPLY_HEADER), b"\xc1"])
    assert (answer.id, answer.kind) == (1, wire.ERROR)
    assert answer.error is not None and answer.error.code == "bad_request"
    assert "malformed REPLY body" in answer.error.message


@pytest.mark.parametrize("frames", [
    [bytes.fromhex(REPLY_HEADER)],
    [bytes.fromhex(REPLY_HEADER), b"\x2a", b"\x2a"],
    [b"\xc1", b"\x2a"],
    [bytes.fromhex(CALL_HEADER), bytes.fromhex(CALL_BODY)],  # a request sent to a client
    [bytes.fromhex(PING_HEADER), bytes.fromhex(NIL)],
])
def test_what_no_request_can_be_matched_with_is_a_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_answer(frames)


@pytest.mark.parametrize(("frames", "expected_id"), [
    ([], 0),
    ([bytes.fromhex(CALL_HEADER)], 1),
    ([bytes.fromhex(CALL_HEADER), b"", b""], 1),
    ([b"\xc1"], 0),
])
def test_a_request_with_the_wrong_frame_count_is_bad_request_with_the_readable_id(
    frames: list[bytes], expected_id: int
) -> None:
    with pytest.raises(ProtocolError, match="expected 2 frames") as info:
        wire.split_request(frames)
    assert (info.value.code, info.value.id) == ("bad_request", expected_id)


def test_unsupported_version_lists_the_versions_spoken() -> None:
    frames = wire.encode_error(9, "unsupported_version", "protocol version 2 is not supported")
    assert wire.unpack(frames[1])["supported"] == [1]
    assert "supported" not in wire.unpack(wire.encode_error(9, "bad_request", "no")[1])


def test_strings_are_str_and_binary_is_bin() -> None:
    assert wire.pack("é") == b"\xa2\xc3\xa9"  # fixstr, UTF-8
    assert wire.pack(b"\xff") == b"\xc4\x01\xff"  # bin 8, never a str
    assert wire.unpack(b"\xc4\x01\xff") == b"\xff"


def test_maps_may_have_non_string_keys() -> None:
    assert wire.unpack(wire.pack({1: "a", "b": 2})) == {1: "a", "b": 2}


def test_pack_rejects_non_msgpack_values() -> None:
    with pytest.raises(TypeError):
        wire.pack(object())


# -- header validation ------------------------------------------------------


def _decode_error(frame: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        wire.decode_header(frame)
    return info.value


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x93\x01", b"\xff" * 3, b"\x98\x01\x01"],
    ids=["empty", "never-used-byte", "truncated-array", "garbage", "truncated-request"],
)
def test_non_msgpack_garbage(frame: bytes) -> None:
    exc = _decode_error(frame)
    assert exc.code == "bad_request"
    assert exc.id == 0


@pytest.mark.parametrize(
    "items",
    [{"v": 1}, 1, "header", [], [1, 2]],
    ids=["map", "int", "str", "empty-array", "two-items"],
)
def test_header_must_be_an_array_of_three_or_more(items: Any) -> None:
    exc = _decode_error(_header(items))
    assert exc.code == "bad_request"
    assert exc.id == 0


@pytest.mark.parametrize(
    "bad_id",
    [-1, -(2**63), "7", 1.0, None, True, b"\x07"],
    ids=["negative", "int64-min", "str", "float", "nil", "bool", "bin"],
)
def test_bad_id(bad_id: Any) -> None:
    exc = _decode_error(_header([1, wire.REPLY, bad_id]))
    assert exc.code == "bad_request"
    assert exc.id == 0


def test_zero_id_is_valid() -> None:
    assert wire.decode_header(_header([1, wire.PING, 0])).id == 0


@pytest.mark.parametrize("kind", [0, 11, 99, -1, "CALL", None])
def test_unknown_kind(kind: Any) -> None:
    exc = _decode_error(_header([1, kind, 5]))
    assert exc.code == "bad_request"
    assert exc.id == 5
    assert "kind" in str(exc)


@pytest.mark.parametrize("version", [0, 2, 255, "1", None])
def test_unsupported_version_keeps_the_id(version: Any) -> None:
    exc = _decode_error(_header([version, wire.CALL, 99, "s", "m", None, None, None]))
    assert exc.code == "unsupported_version"
    assert exc.id == 99
    assert "[1]" in str(exc)  # lists the supported versions


def test_unsupported_version_of_a_future_layout() -> None:
    # A newer version may change everything after the three common items.
    exc = _decode_error(_header([2, 42, 7, {"new": "field"}]))
    assert exc.code == "unsupported_version"
    assert exc.id == 7


def test_unsupported_version_with_unreadable_id() -> None:
    exc = _decode_error(_header([2, wire.CALL, -1]))
    assert exc.code == "bad_request"
    assert exc.id == 0


@pytest.mark.parametrize("kind", [wire.REPLY, wire.ERROR, wire.ACK, wire.PING, wire.PONG])
def test_answer_headers_have_exactly_three_items(kind: int) -> None:
    exc = _decode_error(_header([1, kind, 5, "extra"]))
    assert exc.code == "bad_request"
    assert exc.id == 5


def _request(**changes: Any) -> list[Any]:
    fields = {
        "version": 1, "kind": wire.CALL, "id": 5, "target": "svc", "name": "m",
        "timeout_ms": 100, "traceparent": TRACEPARENT, "meta": {"conn": "c1"},
    }
    fields.update(changes)
    return list(fields.values())


@pytest.mark.parametrize("kind", [wire.CALL, wire.PUSH])
@pytest.mark.parametrize("count", [3, 4, 7, 9])
def test_request_headers_have_exactly_eight_items(kind: int, count: int) -> None:
    items = [*_request(kind=kind), "extra"][:count]
    exc = _decode_error(_header(items))
    assert exc.code == "bad_request"
    assert exc.id == 5
    assert "8 items" in str(exc)


@pytest.mark.parametrize(
    "change",
    [
        {"target": None},
        {"target": 1},
        {"target": b"svc"},
        {"name": ""},
        {"name": None},
        {"name": b"m"},
        {"timeout_ms": -1},
        {"timeout_ms": 1.5},
        {"timeout_ms": "100"},
        {"timeout_ms": True},
        {"traceparent": 1},
        {"traceparent": b"00-"},
        {"meta": "conn=c1"},
        {"meta": ["conn", "c1"]},
        {"meta": {"conn": 1}},
        {"meta": {1: "c1"}},
        {"meta": {"conn": None}},
        {"meta": {"conn": b"c1"}},
    ],
    ids=lambda change: "-".join(f"{k}={v!r}" for k, v in change.items()),
)
def test_request_field_types(change: dict[str, Any]) -> None:
    exc = _decode_error(_header(_request(**change)))
    assert exc.code == "bad_request"
    assert exc.id == 5


def test_request_nils_and_zero_timeout_are_valid() -> None:
    header = wire.decode_header(_header(_request(timeout_ms=0, traceparent=None, meta=None)))
    assert header.timeout_ms == 0
    assert header.traceparent is None and header.meta is None
    assert wire.decode_header(_header(_request(meta={}))).meta == {}


def test_push_target_is_not_validated_beyond_type() -> None:
    header = wire.decode_header(_header(_request(kind=wire.PUSH, target="")))
    assert (header.kind, header.target, header.name) == (wire.PUSH, "", "m")


@pytest.mark.parametrize(
    "items",
    [[True, wire.PING, 5], [1.0, wire.PING, 5], [1, 6.0, 5], _request(kind=True)],
    ids=["version-true", "version-float", "kind-float", "kind-true"],
)
def test_version_and_kind_must_be_integers(items: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_header(_header(items))


# -- bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        [[1]],
        [[1], {}, {}],
        {"args": [], "kwargs": {}},
        [{}, []],
        [[1], []],
        [[1], {1: "x"}],
        [[1], {b"k": 1}],
        [(), None],
    ],
    ids=repr,
)
def test_call_body_errors(body: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_call_body(wire.pack(body), 12)
    assert info.value.code == "bad_request"
    assert info.value.id == 12


def test_call_body_garbage() -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_call_body(b"\xc1", 12)
    assert info.value.code == "bad_request"


def test_call_body_values_round_trip() -> None:
    args = [None, True, -1, 2**64 - 1, 1.5, "s", b"b", [1, [2]], {"k": {3: 4}}]
    kwargs = {"x": {"nested": [b"\x00"]}, "y": None}
    frames = wire.encode_call(1, "s", "m", args, kwargs, None, None, None)
    assert wire.decode_call_body(frames[1], 1) == (args, kwargs)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"code": "draining", "message": "bye"}, wire.ErrorBody("draining", "bye")),
        ({"code": "x"}, wire.ErrorBody("x", "")),
        ({"message": "m"}, wire.ErrorBody("remote_error", "m")),
        ({"code": 3, "message": 4, "type": 5, "traceback": 6}, wire.ErrorBody("remote_error", "")),
        ({"code": "c", "message": "m", "extra": [1]}, wire.ErrorBody("c", "m")),
        ({}, wire.ErrorBody("remote_error", "")),
        (
            {"code": "handler_error", "message": "m", "type": "E", "traceback": "tb"},
            wire.ErrorBody("handler_error", "m", "E", "tb"),
        ),
    ],
    ids=repr,
)
def test_error_body_tolerates_other_implementations(body: Any, expected: wire.ErrorBody) -> None:
    assert wire.decode_error_body(wire.pack(body)) == expected


@pytest.mark.parametrize("body", [None, "oops", [1, 2], 7])
def test_error_body_that_is_not_a_map(body: Any) -> None:
    decoded = wire.decode_error_body(wire.pack(body))
    assert decoded.code == "bad_request"
    assert "malformed ERROR body" in decoded.message


def test_error_body_message_is_bounded() -> None:
    decoded = wire.decode_error_body(wire.pack(["x" * 10_000]))
    assert len(decoded.message) <= 200


def test_error_body_garbage_raises() -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_error_body(b"\xc1")
    assert info.value.code == "bad_request"


def test_unpack_garbage() -> None:
    with pytest.raises(ProtocolError) as info:
        wire.unpack(b"\x92\x01")
    assert info.value.code == "bad_request"
    assert "MessagePack" in str(info.value)


# -- hostile headers: answered with the id, in a few hundred bytes -----------------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["version", "kind"])
def test_thousand_deep_version_or_kind_is_answered_with_the_id(where: str) -> None:
    # repr() of such a value raised RecursionError out of decode_header, and
    # the message was dropped unanswered.
    items = _request(**{where: _nested(1000)})
    exc = _decode_error(_header(items))
    assert exc.code == ("unsupported_version" if where == "version" else "bad_request")
    assert exc.id == 5
    assert len(str(exc)) < 300


@pytest.mark.parametrize("where", ["version", "kind"])
def test_deeper_than_the_decoder_stack_still_gives_the_id(where: str) -> None:
    # msgpack's decoder stops at 1,024 levels (StackError): the whole header is
    # not decodable, but its id can still be read.
    deep = b"\x91" * 3000 + b"\x01"
    rest = {"version": (deep, b"\x01"), "kind": (b"\x01", deep)}[where]
    frame = b"\x98" + rest[0] + rest[1] + b"\xcd\x01\x2c" + _header(["s", "m", None, None, None])[1:]
    exc = _decode_error(frame)
    assert (exc.code, exc.id) == ("bad_request", 300)
    assert len(str(exc)) < 300


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (_header([1, 1, 42]) + b"junk", 42),  # trailing bytes after a valid header
        (_header([{"a": [1, 2, {"b": b"x"}]}, "k", 2**64 - 1, None])[:-1] + b"\xc1", 2**64 - 1),
        (b"\xdc\x00\x08" + _header([1.5, b"\x00" * 300, 7])[1:] + b"\xc1", 7),  # array16, float, bin
        (b"\x93\x01\x01", 0),  # truncated before the id
        (_header([1, 1, -3]) + b"x", 0),  # id not an unsigned integer
        (_header([1, 1, "7"]) + b"x", 0),
        (_header({"id": 1}) + b"x", 0),  # not an array
        (b"\x93\x01\xc1\x05", 0),  # the never-used byte before the id
        (b"\x93" + b"\xdd\xff\xff\xff\xff" + b"\x01\x05", 0),  # claims 4 billion items
        (b"", 0),
    ],
)
def test_peek_id(frame: bytes, expected: int) -> None:
    assert wire.peek_id(frame) == expected
    assert _decode_error(frame).id == expected


def test_header_over_the_size_limit_is_refused_with_the_id() -> None:
    frame = _header(_request(meta={"k": "v" * 70_000}))
    exc = _decode_error(frame)
    assert (exc.code, exc.id) == ("bad_request", 5)
    assert "exceeds" in str(exc) and len(str(exc)) < 200
    assert wire.decode_header(frame, max_size=len(frame)).meta == {"k": "v" * 70_000}


@pytest.mark.parametrize("field", ["name", "target"])
def test_names_over_the_length_limit_are_refused(field: str) -> None:
    assert wire.decode_header(_header(_request(**{field: "n" * wire.MAX_NAME_LENGTH})))
    exc = _decode_error(_header(_request(**{field: "n" * (wire.MAX_NAME_LENGTH + 1)})))
    assert (exc.code, exc.id) == ("bad_request", 5)
    assert "at most 256 characters" in str(exc)
    assert wire.decode_header(_header(_request(**{field: "n" * 300})), max_name=300)


def test_four_mib_version_gives_a_short_error() -> None:
    frame = _header(_request(version="v" * (4 << 20)))
    exc = _decode_error(frame)  # over the header bound
    assert len(str(exc)) < 200
    exc = _decode_error(_header(_request(version="v" * 60_000)))  # under it: the value is clipped
    assert exc.code == "unsupported_version" and exc.id == 5
    assert len(str(exc)) < 300


@pytest.mark.parametrize("kind", ["k" * 60_000, {"k" * 1000: ["x" * 1000] * 20}, b"\xff" * 60_000])
def test_a_huge_kind_gives_a_short_error(kind: Any) -> None:
    exc = _decode_error(_header([1, kind, 9]))
    assert (exc.code, exc.id) == ("bad_request", 9)
    assert len(str(exc)) < 300


def test_error_body_fields_are_bounded() -> None:
    body = {"code": "c" * 10_000, "message": "m" * (1 << 20), "type": "T" * 10_000, "traceback": "t" * (1 << 20)}
    decoded = wire.decode_error_body(wire.pack(body))
    assert len(decoded.code) <= wire.MAX_ERROR_CODE + 32
    assert len(decoded.message) <= wire.MAX_ERROR_MESSAGE + 32
    assert len(decoded.type) <= wire.MAX_ERROR_TYPE + 32
    assert decoded.traceback is not None and len(decoded.traceback) <= wire.MAX_ERROR_TRACEBACK + 32


def test_error_body_deeply_nested_is_described_not_raised() -> None:
    decoded = wire.decode_error_body(wire.pack(_nested(1000)))
    assert decoded.code == "bad_request" and len(decoded.message) < 300


def test_settings_defaults_are_the_wire_defaults() -> None:
    from meshkit.config import Settings

    assert Settings().max_header_size == wire.MAX_HEADER_SIZE
    assert Settings().max_name_length == wire.MAX_NAME_LENGTH


# -- bodies: MessagePack's expansion is bounded --------------------------------


def _empty_arrays(count: int) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def test_a_body_of_empty_arrays_is_refused_in_bounded_time_and_memory() -> None:
    # Every \x90 byte decodes to a new empty list (~64 bytes): 2 MiB of them
    # became 129 MiB of objects, held for as long as the call was.
    import time
    import tracemalloc

    body = wire.pack([[], {}])[:1] + _empty_arrays(2 << 20) + b"\x80"
    tracemalloc.start()
    started = time.process_time()
    try:
        with pytest.raises(ProtocolError) as info:
            wire.decode_call_body(body, 7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.value.code, info.value.id) == ("bad_request", 7)
    assert "more than 100000 arrays and maps" in str(info.value)
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB"
    assert time.process_time() - started < 5


def test_containers_are_counted_exactly_and_limited() -> None:
    body = _empty_arrays(2000)
    value, containers = wire.unpack_body(body, max_containers=2001)
    assert (len(value), containers) == (2000, 2001)
    with pytest.raises(ProtocolError):
        wire.unpack_body(body, max_containers=2000)
    # Bytes inside binary data that look like containers are not counted.
    blob = wire.pack([bytes(range(256)) * 40, {"a": [1]}])
    assert wire.unpack_body(blob, max_containers=3) == ([bytes(range(256)) * 40, {"a": [1]}], 3)
    assert wire.decode_call(wire.pack([[1, [2]], {"k": {}}]), 1) == ([1, [2]], {"k": {}}, 5)


def test_pack_is_packb_and_safe_from_many_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    values = [[i, "x" * (i % 50), b"\x00" * (i % 7), {"k": [i] * (i % 5)}] for i in range(2000)]
    with ThreadPoolExecutor(4) as pool:
        packed = list(pool.map(wire.pack, values))
    assert packed == [msgpack.packb(v, use_bin_type=True) for v in values]
    with pytest.raises(TypeError):
        wire.pack({1, 2})
    assert wire.pack([1]) == b"\x91\x01"  # a failed pack leaves nothing behind in the packer
