"""The Stratum lines as miners parse them: JSON-RPC 1.0 style, error null or an array."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.stratum import messages
from services.stratum.messages import Method
from services.stratum.shares import ShareResult, Verdict
from services.stratum.work import stratum_prevhash


def test_answers_always_carry_result_and_error() -> None:
    assert messages.encode(messages.result(4, True)) == b'{"id":4,"result":true,"error":null}\n'
    assert json.loads(messages.encode(messages.error(5, 24, "Unauthorized worker"))) == {
        "id": 5, "result": None, "error": [24, "Unauthorized worker", None]}


def test_share_answers() -> None:
    assert messages.share_answer(9, ShareResult(Verdict.ACCEPTED)) == {"id": 9, "result": True, "error": None}
    assert messages.share_answer(9, ShareResult(Verdict.BLOCK_CANDIDATE))["result"] is True
    stale = messages.share_answer(9, ShareResult(Verdict.STALE, "job 1 was replaced"))
    assert stale == {"id": 9, "result": None, "error": [21, "Job not found (=stale)", None]}
    bad = messages.share_answer(9, ShareResult(Verdict.MALFORMED, "ntime out of range"))
    assert bad["error"] == [20, "ntime out of range", None]


def test_subscribe_and_pushes() -> None:
    assert messages.subscribe_result("ab12", bytes.fromhex("0001002a"), 4) == [
        [["mining.set_difficulty", "ab12"], ["mining.notify", "ab12"]], "0001002a", 4]
    assert messages.set_difficulty(16.0) == {"id": None, "method": "mining.set_difficulty", "params": [16]}
    assert messages.set_difficulty(2**-20)["params"] == [2**-20]
    assert messages.set_extranonce(b"\x01\x02", 6)["params"] == ["0102", 6]
    assert messages.reconnect("pool.example", 3333, 5) == {
        "id": None, "method": "client.reconnect", "params": ["pool.example", 3333, 5]}
    assert messages.request(1, Method.SUBSCRIBE, []) == {"id": 1, "method": "mining.subscribe", "params": []}


def test_decode_refuses_what_is_not_one_message() -> None:
    assert messages.decode(b'{"id":1,"result":true,"error":null}\n')["result"] is True
    for line, words in ((b"[1,2]", "not a JSON object"), (b"{nope", "not JSON"),
                        (b"[" * 100_000, "over the"), (b"[" * 10_000, "not JSON")):
        with pytest.raises(ValueError, match=words):
            messages.decode(line)
    with pytest.raises(ValueError) as caught:
        messages.decode(b"x" * (messages.MAX_LINE - 1))
    assert len(str(caught.value)) < 200  # the echoed line is clipped


def test_docs_carry_every_method_verdict_and_vector() -> None:
    """``docs/stratum.md`` cannot drift from the code: every method, verdict row and byte-order vector."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "stratum.md").read_text()
    for method in Method:
        assert f"`{method.value}`" in doc, method
    for verdict in Verdict:
        if verdict.code is None:
            assert f"| `{verdict.word}` | — | — |" in doc, verdict
        elif verdict is Verdict.MALFORMED:
            assert f"| `{verdict.word}` | {verdict.code} | *(the detail)* |" in doc
        else:
            assert f"| `{verdict.word}` | {verdict.code} | {verdict.message} |" in doc, verdict
    prev = bytes.fromhex("00000000000008a3a41b85b8b29ad444def299fee21793cd8b9e567eab02cd81")[::-1]
    assert stratum_prevhash(prev) in doc
    assert '"7c2bac1d"' in doc and "03 fc 79 03" in doc
