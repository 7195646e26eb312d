"""The gateway's dialects and its per-connection push (pure parts: shapes, payloads, refusals)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshkit.errors import HandlerError, RefusedError, UnknownConnectionError
from meshkit.gateway import GatewayOptions, gateway_of, jsonrpc
from meshkit.gateway.dialect import Dialect, named
from meshkit.gateway.push import Delivery, deliver

STRATUM = named("stratum")
JSONRPC = named("jsonrpc")


def test_stratum_answers_carry_result_and_error_and_no_jsonrpc_member() -> None:
    ok, _ = STRATUM.answer_line([STRATUM.result_doc(4, True)], batch=False)
    assert json.loads(ok) == {"id": 4, "result": True, "error": None}
    err = json.loads(STRATUM.error_line(5, jsonrpc.METHOD_NOT_FOUND, "unknown service 'x'"))
    assert err == {"id": 5, "result": None,
                   "error": [-32601, "unknown service 'x'", {"code": "method_not_found"}]}
    push = json.loads(STRATUM.notification_line("mining.set_difficulty", [2]))
    assert push == {"id": None, "method": "mining.set_difficulty", "params": [2]}


def test_jsonrpc_is_the_default_and_unchanged() -> None:
    assert GatewayOptions().dialect == "jsonrpc"
    assert JSONRPC.result_doc(1, 2) == jsonrpc.result_doc(1, 2)
    assert JSONRPC.error_line(None, -32700, "bad") == jsonrpc.error_line(None, -32700, "bad")
    assert JSONRPC.notification_line("t", 1) == jsonrpc.notification_line("t", 1)


def test_a_stratum_answer_json_cannot_hold_is_replaced_in_the_stratum_shape() -> None:
    line, problems = STRATUM.answer_line([STRATUM.result_doc(7, float("nan"))], batch=False)
    doc = json.loads(line)
    assert doc["id"] == 7 and doc["result"] is None and doc["error"][0] == jsonrpc.INTERNAL_ERROR
    assert problems
    big = [STRATUM.result_doc(i, "x" * 1000) for i in range(4)]
    line, _ = STRATUM.answer_line(big, batch=True, limit=2500)
    cut = [d for d in json.loads(line) if d["error"] is not None]
    assert cut and all(d["error"][2]["code"] == "too_large" for d in cut)


def test_an_unknown_dialect_is_a_config_error() -> None:
    from meshkit.errors import ConfigError

    with pytest.raises(ConfigError, match="dialect"):
        GatewayOptions(dialect="xml")
    with pytest.raises(ValueError):
        named("xml")
    assert isinstance(named("stratum"), Dialect)


def test_a_refusal_with_a_client_code_becomes_that_error() -> None:
    code, message, data = jsonrpc.error_for(RefusedError("Low difficulty share", client_code=23))
    assert (code, message, data) == (23, "Low difficulty share", {"code": "refused"})
    code, message, _ = jsonrpc.error_for(RefusedError("no"))
    assert (code, message) == (jsonrpc.HANDLER_ERROR, "no")
    code, message, _ = jsonrpc.error_for(HandlerError("boom", remote_type="ValueError"))
    assert (code, message) == (jsonrpc.HANDLER_ERROR, "ValueError: boom")


def test_a_connection_id_names_its_gateway() -> None:
    assert gateway_of("0123456789ab-1f") == "0123456789ab"
    assert [gateway_of(c) for c in ("", "nodash", "-1", "abc-")] == ["", "", "", ""]


class FakeConn:
    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.subscriptions: set[str] = set()
        self.lines: list[bytes] = []

    def send(self, line: bytes) -> bool:
        if self.closed:
            return False
        self.lines.append(line)
        return True


OPTIONS = GatewayOptions(topics=("mining.notify",), max_subscriptions=2)


def test_a_delivery_goes_to_its_connection_alone_in_the_listeners_dialect() -> None:
    conns = {"gw-1": FakeConn(), "gw-2": FakeConn()}
    payload = Delivery("gw-1", "mining.notify", ["j1"], ("mining.notify",)).payload()
    deliver(payload, conns, OPTIONS, STRATUM, "gw")
    assert [json.loads(x) for x in conns["gw-1"].lines] == [
        {"id": None, "method": "mining.notify", "params": ["j1"]}]
    assert conns["gw-1"].subscriptions == {"mining.notify"}
    assert conns["gw-2"].lines == [] and conns["gw-2"].subscriptions == set()
    deliver(Delivery("gw-2", None, subscribe=("mining.notify",)).payload(), conns, OPTIONS, STRATUM, "gw")
    assert conns["gw-2"].lines == [] and conns["gw-2"].subscriptions == {"mining.notify"}


@pytest.mark.parametrize("payload, error", [
    ({"conn": "gw-9", "method": "m"}, UnknownConnectionError),
    ({"conn": "gw-closed", "method": "m"}, UnknownConnectionError),
    ({"conn": "gw-1", "method": "m", "params": float("nan")}, RefusedError),
    ({"conn": "gw-1", "method": "m", "subscribe": ["secret.topic"]}, RefusedError),
    ({"conn": "gw-1", "method": "m", "subscribe": "mining.notify"}, RefusedError),
    ({"conn": 5, "method": "m"}, RefusedError),
    ({"conn": "gw-1", "method": ""}, RefusedError),
    (["not", "a", "map"], RefusedError),
    (None, RefusedError),
])
def test_a_bad_or_misaddressed_delivery_is_refused_never_raised_otherwise(payload: Any,
                                                                        error: type[Exception]) -> None:
    conns = {"gw-1": FakeConn(), "gw-closed": FakeConn(closed=True)}
    with pytest.raises(error) as caught:
        deliver(payload, conns, OPTIONS, STRATUM, "gw")
    assert type(caught.value) is error
    assert conns["gw-1"].lines == [] and conns["gw-1"].subscriptions == set()
