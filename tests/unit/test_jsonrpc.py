"""The gateway's JSON-RPC 2.0 layer: parsing lines, formatting answers, mapping mesh errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshkit.errors import (
    BadArgumentsError,
    CallTimeoutError,
    HandlerError,
    LostPeerError,
    MessageTooLargeError,
    NoInstanceError,
    RemoteError,
    UnknownMethodError,
)
from meshkit.gateway import jsonrpc, rpcerrors
from meshkit.gateway.jsonrpc import Invalid, Request, parse_line, parse_request


def one(line: bytes) -> jsonrpc.Item:
    parsed = parse_line(line)
    assert parsed is not None and not parsed.batch and len(parsed.items) == 1
    return parsed.items[0]


def test_codes_are_the_documented_ones() -> None:
    assert (jsonrpc.PARSE_ERROR, jsonrpc.INVALID_REQUEST, jsonrpc.METHOD_NOT_FOUND,
            jsonrpc.INVALID_PARAMS, jsonrpc.INTERNAL_ERROR) == (-32700, -32600, -32601, -32602, -32603)
    server_codes = [jsonrpc.TIMEOUT, jsonrpc.NO_INSTANCE, jsonrpc.LOST_PEER,
                    jsonrpc.TOO_MANY_IN_FLIGHT, jsonrpc.LINE_TOO_LONG, jsonrpc.HANDLER_ERROR,
                    jsonrpc.TOO_MANY_CONNECTIONS, jsonrpc.IDLE_TIMEOUT, jsonrpc.SHUTTING_DOWN,
                    jsonrpc.SLOW_CONSUMER, jsonrpc.BATCH_TOO_LARGE, jsonrpc.BANNED,
                    jsonrpc.RATE_LIMITED, jsonrpc.ADDRESS_LIMITED]
    assert server_codes == list(range(-32000, -32014, -1))
    assert set(jsonrpc.REASONS) == {-32700, -32600, -32601, -32602, -32603, *server_codes}
    for code, reason in jsonrpc.REASONS.items():
        assert f"{code}  {reason}" in (rpcerrors.__doc__ or ""), reason


def test_a_request_with_positional_params() -> None:
    item = one(b'{"jsonrpc":"2.0","method":"shares.submit","params":["ab","0000ffff"],"id":7}')
    assert item == Request(7, "shares.submit", ["ab", "0000ffff"])


def test_named_params_string_id_and_crlf() -> None:
    item = one(b'{"jsonrpc":"2.0","method":"a.b","params":{"x":1},"id":"q1"}\r')
    assert item == Request("q1", "a.b", {"x": 1})


def test_no_id_is_a_notification_and_null_id_is_not() -> None:
    assert one(b'{"jsonrpc":"2.0","method":"a.b"}') == Request(None, "a.b", None, notification=True)
    assert one(b'{"jsonrpc":"2.0","method":"a.b","id":null}') == Request(None, "a.b", None)


@pytest.mark.parametrize("line", [b"", b"   ", b"\r", b"\t \r"])
def test_blank_lines_are_skipped(line: bytes) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize("line", [b"{", b"not json", b'{"a":NaN}', b"\xff\xfe", b"[" * 100_000])
def test_bad_json_is_a_parse_error_with_null_id(line: bytes) -> None:
    item = one(line)
    assert isinstance(item, Invalid) and item.code == jsonrpc.PARSE_ERROR and item.id is None


def test_stratum_style_request_without_jsonrpc_member_is_accepted() -> None:
    assert one(b'{"id":1,"method":"mining.subscribe","params":[]}') == Request(1, "mining.subscribe", [])


@pytest.mark.parametrize("doc, rid", [
    ({"jsonrpc": "1.0", "method": "a.b", "id": 2}, 2),
    ({"jsonrpc": "2.0", "id": 3}, 3),                            # no method
    ({"jsonrpc": "2.0", "method": "", "id": 4}, 4),
    ({"jsonrpc": "2.0", "method": 5, "id": 5}, 5),
    ({"jsonrpc": "2.0", "method": "a.b", "params": "x", "id": 6}, 6),
    ({"jsonrpc": "2.0", "method": "a.b", "params": None, "id": 7}, 7),
    ({"jsonrpc": "2.0", "method": "a.b", "id": {"x": 1}}, None),  # id of a bad type
    ({"jsonrpc": "2.0", "method": "a.b", "id": True}, None),
    ({"jsonrpc": "2.0", "method": "a.b", "id": float("inf")}, None),  # no answer could carry it
    ({"jsonrpc": "2.0", "method": "a.b", "id": float("-inf")}, None),
    ({"jsonrpc": "2.0", "method": "a.b", "id": float("nan")}, None),
    ("a string", None),
    (42, None),
])
def test_invalid_requests_keep_their_id_where_it_is_usable(doc: Any, rid: Any) -> None:
    item = parse_request(doc)
    assert isinstance(item, Invalid)
    assert item.code == jsonrpc.INVALID_REQUEST and item.id == rid


@pytest.mark.parametrize("line", [b'{"jsonrpc":"2.0","method":"a.b","id":1e400}',
                                  b'{"jsonrpc":"2.0","method":"a.b","id":-1e400}'])
def test_an_id_too_large_for_a_double_is_an_invalid_request(line: bytes) -> None:
    # Python parses it as infinity, which JSON cannot encode back.
    item = one(line)
    assert isinstance(item, Invalid) and item.code == jsonrpc.INVALID_REQUEST and item.id is None
    assert one(b'{"jsonrpc":"2.0","method":"a.b","id":1e300}') == Request(1e300, "a.b", None)


def test_batches_hold_each_item_separately() -> None:
    parsed = parse_line(b'[{"jsonrpc":"2.0","method":"a.b","id":1}, 5, '
                        b'{"jsonrpc":"2.0","method":"c.d"}]')
    assert parsed is not None and parsed.batch
    first, second, third = parsed.items
    assert first == Request(1, "a.b", None)
    assert isinstance(second, Invalid) and second.code == jsonrpc.INVALID_REQUEST
    assert third == Request(None, "c.d", None, notification=True)


def test_an_empty_batch_is_invalid() -> None:
    item = one(b"[]")
    assert isinstance(item, Invalid) and item.code == jsonrpc.INVALID_REQUEST


@pytest.mark.parametrize("method, expected", [
    ("shares.submit", ("shares", "submit")),
    ("a.b.c", ("a", "b.c")),
    ("noservice", None),
    (".x", None),
    ("x.", None),
])
def test_split_method(method: str, expected: tuple[str, str] | None) -> None:
    assert jsonrpc.split_method(method) == expected


@pytest.mark.parametrize("exc, code", [
    (CallTimeoutError("t"), jsonrpc.TIMEOUT),
    (NoInstanceError("n"), jsonrpc.NO_INSTANCE),
    (LostPeerError("l"), jsonrpc.LOST_PEER),
    (UnknownMethodError("u"), jsonrpc.METHOD_NOT_FOUND),
    (BadArgumentsError("b"), jsonrpc.INVALID_PARAMS),
    (MessageTooLargeError("m"), jsonrpc.INTERNAL_ERROR),
    (RemoteError("r"), jsonrpc.INTERNAL_ERROR),
])
def test_mesh_errors_map_to_json_rpc_codes_and_keep_the_mesh_code(exc: Any, code: int) -> None:
    got, message, data = jsonrpc.error_for(exc)
    assert got == code and message == str(exc) and data == {"code": exc.code}


def test_handler_errors_name_the_exception_type() -> None:
    exc = HandlerError("nonce must be 8 hex digits", remote_type="InvalidShare")
    code, message, data = jsonrpc.error_for(exc)
    assert code == jsonrpc.HANDLER_ERROR
    assert message == "InvalidShare: nonce must be 8 hex digits"
    assert data == {"code": "handler_error", "type": "InvalidShare"}


def test_answers_are_single_json_lines() -> None:
    line, problems = jsonrpc.answer_line([jsonrpc.result_doc(1, {"ok": b"bytes", "t": (1, 2)})],
                                         batch=False)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and problems == []
    assert json.loads(line) == {"jsonrpc": "2.0", "id": 1, "result": {"ok": "bytes", "t": [1, 2]}}
    err = json.loads(jsonrpc.error_line(None, jsonrpc.LINE_TOO_LONG, "too long"))
    assert err == {"jsonrpc": "2.0", "id": None, "error": {
        "code": -32004, "message": "too long", "data": {"code": "line_too_long"}}}
    line, problems = jsonrpc.answer_line([jsonrpc.result_doc(1, 2), jsonrpc.error_doc(
        2, jsonrpc.TIMEOUT, "late", {"code": "timeout"})], batch=True)
    batch = json.loads(line)
    assert [a["id"] for a in batch] == [1, 2] and batch[1]["error"]["code"] == -32000
    assert line.count(b"\n") == 1 and problems == []


def test_notifications_carry_the_topic_as_method() -> None:
    note = json.loads(jsonrpc.notification_line("jobs.notify", {"job_id": "ab"}))
    assert note == {"jsonrpc": "2.0", "method": "jobs.notify", "params": {"job_id": "ab"}}


def test_an_answer_json_cannot_hold_becomes_an_error_with_its_id() -> None:
    line, problems = jsonrpc.answer_line([jsonrpc.result_doc(7, float("nan"))], batch=False)
    answer = json.loads(line)  # valid JSON: NaN is not sent
    assert answer["id"] == 7 and answer["error"]["code"] == jsonrpc.INTERNAL_ERROR
    assert len(problems) == 1 and "7" in problems[0]


def test_in_a_batch_one_bad_answer_spoils_only_itself() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    docs = [jsonrpc.result_doc(1, "fine"), jsonrpc.result_doc(2, float("inf")),
            jsonrpc.result_doc(3, cycle), jsonrpc.error_doc(4, jsonrpc.TIMEOUT, "late")]
    line, problems = jsonrpc.answer_line(docs, batch=True)
    answers = json.loads(line)
    assert [a["id"] for a in answers] == [1, 2, 3, 4]
    assert answers[0]["result"] == "fine" and answers[3]["error"]["code"] == jsonrpc.TIMEOUT
    assert [a["error"]["code"] for a in answers[1:3]] == [jsonrpc.INTERNAL_ERROR] * 2
    assert len(problems) == 2


def test_an_id_json_cannot_hold_falls_back_to_null() -> None:
    # parse_request lets no such id through; the encoder copes anyway.
    line, problems = jsonrpc.answer_line([jsonrpc.result_doc(float("inf"), 1),
                                          jsonrpc.result_doc(2, 2)], batch=True)
    answers = json.loads(line)
    assert answers[0]["id"] is None and answers[0]["error"]["code"] == jsonrpc.INTERNAL_ERROR
    assert answers[1] == {"jsonrpc": "2.0", "id": 2, "result": 2} and len(problems) == 1


def test_pushes_json_cannot_hold_are_refused_rather_than_sent_as_invalid_json() -> None:
    with pytest.raises(jsonrpc.UNENCODABLE):
        jsonrpc.notification_line("jobs.notify", float("nan"))


@pytest.mark.parametrize("text", ['{"jsonrpc":"2.0","method":"a.b","id":1}', '{"method":"a.b","id":"\u00e9"}'])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"])
def test_lines_that_are_not_utf8_are_parse_errors(text: str, encoding: str) -> None:
    # json.loads on bytes would detect UTF-16/32 and accept them; the protocol says UTF-8.
    item = one(text.encode(encoding))
    assert isinstance(item, Invalid) and item.code == jsonrpc.PARSE_ERROR and item.id is None
    assert "UTF-8" in item.message


def test_latin1_bytes_are_a_parse_error_that_says_where() -> None:
    item = one('{"method":"a.b","id":"caf\u00e9"}'.encode("latin-1"))
    assert isinstance(item, Invalid) and item.code == jsonrpc.PARSE_ERROR
    assert "0xe9" in item.message and "position 25" in item.message


def test_a_batch_over_max_batch_is_one_error_and_nothing_is_parsed_as_requests() -> None:
    line = b"[" + b",".join([b'{"method":"a.b","id":1}'] * 65) + b"]"
    item = one(jsonrpc_line := line)
    assert isinstance(item, Invalid) and item.code == jsonrpc.BATCH_TOO_LARGE and item.id is None
    assert "65" in item.message and "64" in item.message
    parsed = parse_line(jsonrpc_line, max_batch=65)
    assert parsed is not None and parsed.batch and len(parsed.items) == 65
    # The 16 KiB line of tiny items that used to cost 8,190 answers costs one.
    flood = parse_line(b"[" + b"1," * 8189 + b"1]")
    assert flood is not None and len(flood.items) == 1 and not flood.batch


def test_a_batch_answer_is_cut_to_its_limit_and_keeps_every_id() -> None:
    docs = [jsonrpc.result_doc(i, "x" * 100_000) for i in range(8)] + [jsonrpc.result_doc("s", 1)]
    line, problems = jsonrpc.answer_line(docs, batch=True, limit=350_000)
    assert len(line) <= 350_000
    answers = json.loads(line)
    assert [a["id"] for a in answers] == [*range(8), "s"]
    kept = [a for a in answers if "result" in a]
    assert len(kept) == 4 and answers[-1]["result"] == 1  # the small one is never the one cut
    cut = [a for a in answers if "error" in a]
    assert all(a["error"]["code"] == jsonrpc.INTERNAL_ERROR for a in cut)
    assert cut[0]["error"]["data"] == {"code": "too_large", "limit": 350_000}
    assert len(problems) == 5
    # A single answer is not cut: it goes out alone, whatever its size.
    single, _ = jsonrpc.answer_line(docs[:1], batch=False, limit=1000)
    assert json.loads(single)["result"] == "x" * 100_000


def test_mesh_error_messages_are_clipped() -> None:
    exc = UnknownMethodError("no method " + "m" * 100_000)
    _code, message, _data = jsonrpc.error_for(exc)
    assert len(message) < 1100 and message.startswith("no method mmm")


def test_docs_list_every_error_code_and_built_in() -> None:
    from pathlib import Path

    from meshkit.gateway import builtin

    doc = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    for code, reason in jsonrpc.REASONS.items():
        assert f"| {code} | `{reason}`" in doc, reason
    for name in builtin.NAMES:
        assert f"| `{name}` |" in doc, name
