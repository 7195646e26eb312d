"""The instance record: its key, its states and its JSON form in Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshkit.errors import ConfigError
from meshkit.record import DRAINING, STATES, UP, InstanceRecord

FULL = InstanceRecord(
    service="stratum",
    instance_id="a1b2c3",
    endpoint="tcp://10.0.0.7:41234",
    host="node-7",
    pid=4242,
    version="1.2.0",
    methods=("submit", "subscribe"),
    idempotent=("subscribe",),
    topics=("jobs.new", "blocks.*"),
    state=DRAINING,
    started_at=1700000000.25,
    listeners={"stratum": "10.0.0.7:3333"},
    max_message_size=1048576,
)

FULL_JSON = (
    '{"service":"stratum","instance_id":"a1b2c3","endpoint":"tcp://10.0.0.7:41234",'
    '"host":"node-7","pid":4242,"version":"1.2.0","methods":["submit","subscribe"],'
    '"idempotent":["subscribe"],"topics":["jobs.new","blocks.*"],"state":"draining",'
    '"started_at":1700000000.25,"listeners":{"stratum":"10.0.0.7:3333"},"max_message_size":1048576}'
)

MINIMAL = {"service": "s", "instance_id": "i", "endpoint": "tcp://h:1", "host": "h", "pid": 1}


def test_states() -> None:
    assert (UP, DRAINING) == ("up", "draining")
    assert STATES == (UP, DRAINING)


def test_key_and_state() -> None:
    assert FULL.key == "stratum:a1b2c3"
    assert not FULL.is_up
    up = FULL.with_state(UP)
    assert up.is_up and up.state == "up"
    assert up.key == FULL.key and up.methods == FULL.methods
    assert FULL.state == DRAINING  # records are immutable


def test_to_json_is_compact_and_stable() -> None:
    assert FULL.to_json() == FULL_JSON


def test_json_round_trip() -> None:
    assert InstanceRecord.from_json(FULL.to_json()) == FULL
    assert InstanceRecord.from_json(FULL.to_json().encode()) == FULL


def test_defaults_round_trip() -> None:
    rec = InstanceRecord("s", "i", "tcp://h:1", "h", 1)
    assert InstanceRecord.from_json(rec.to_json()) == rec


def test_optional_fields_may_be_missing() -> None:
    rec = InstanceRecord.from_json(json.dumps(MINIMAL))
    assert rec == InstanceRecord("s", "i", "tcp://h:1", "h", 1)
    assert rec.state == UP and rec.methods == () and rec.listeners == {}


def test_unknown_fields_are_ignored() -> None:
    rec = InstanceRecord.from_json(json.dumps({**MINIMAL, "from_the_future": [1, 2]}))
    assert rec.key == "s:i"


def test_values_are_normalised() -> None:
    raw = {**MINIMAL, "pid": "17", "started_at": 3, "methods": [1]}
    rec = InstanceRecord.from_json(json.dumps(raw))
    assert rec.pid == 17
    assert rec.started_at == 3.0 and isinstance(rec.started_at, float)
    assert rec.methods == ("1",)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        b"\xff\xfe",
        "null",
        "[]",
        "42",
        '"record"',
        "{}",
        *(json.dumps({k: v for k, v in MINIMAL.items() if k != missing}) for missing in MINIMAL),
        json.dumps({**MINIMAL, "pid": "many"}),
        json.dumps({**MINIMAL, "pid": None}),
        json.dumps({**MINIMAL, "started_at": "noon"}),
        json.dumps({**MINIMAL, "methods": 5}),
        json.dumps({**MINIMAL, "listeners": 5}),
        json.dumps({**MINIMAL, "listeners": ["a"]}),
    ],
    ids=repr,
)
def test_malformed_records_raise_value_error(text: Any) -> None:
    with pytest.raises(ValueError, match="malformed instance record"):
        InstanceRecord.from_json(text)


# -- the grammar, at both ends (issue #7, defect 1) ----------------------------------

INJECTION = "fe80::1%x;shutdown frontend stratum "


def _short(value: object) -> str:
    return repr(value)[:60]


@pytest.mark.parametrize(
    "changes",
    [
        {"listeners": {"stratum": f"{INJECTION}:4000"}},
        {"listeners": {"stratum": f"[{INJECTION}]:4000"}},
        {"listeners": {"stratum": "fe80::1%a\nb:4000"}},
        {"listeners": {"stratum": "10.0.0.1:4000 check; disable server x"}},
        {"listeners": {"stratum": "10.0.0.1:0"}},
        {"listeners": {"stratum": "10.0.0.1:+80"}},
        {"listeners": {"stra:tum": "10.0.0.1:4000"}},
        {"listeners": {"*": "10.0.0.1:4000"}},
        {"host": INJECTION},
        {"host": "node 7"},
        {"host": "-node"},
        {"endpoint": f"tcp://{INJECTION}:4000"},
        {"endpoint": "ipc:///tmp/x"},
        {"endpoint": "tcp://h:1\n"},
        {"service": "a:b"},
        {"service": "a*"},
        {"service": "Upper"},
        {"instance_id": "i:1"},
        {"instance_id": "i[1]"},
        {"instance_id": "i?"},
        {"instance_id": "x" * 65},
        {"state": "sideways"},
        {"pid": True},
        {"pid": -1},
        {"started_at": float("nan")},
        {"methods": ["get\nuser"]},
        {"methods": ["m"] * 1001},
        {"version": "1\n2"},
        {"max_message_size": -5},
    ],
    ids=_short,
)
def test_records_outside_the_grammar_are_refused_when_read(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="malformed instance record"):
        InstanceRecord.from_json(json.dumps({**MINIMAL, **changes}))


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, "[" * 20_000 + "]" * 20_000, json.dumps({**MINIMAL, "version": "v" * 70_000})],
    ids=["100k-open", "20k-deep", "huge"],
)
def test_giant_or_deep_records_are_refused_without_a_crash(text: str) -> None:
    with pytest.raises(ValueError, match="malformed instance record") as caught:
        InstanceRecord.from_json(text)
    assert len(str(caught.value)) < 300  # the value is clipped, never echoed whole


@pytest.mark.parametrize(
    "changes",
    [
        {"host": "fe80::1%eth0", "endpoint": "tcp://[fe80::1%eth0]:4000"},
        {"endpoint": "tcp://::1:4000", "listeners": {"stratum": "::1:4001"}},
        {"listeners": {"stratum": "[::1]:4001", "http": "gw-7.example.com:80"}},
        {"host": "node-7.local", "instance_id": "a1b2.c3_d-4"},
    ],
    ids=repr,
)
def test_records_inside_the_grammar_are_read(changes: dict[str, Any]) -> None:
    rec = InstanceRecord.from_json(json.dumps({**MINIMAL, **changes}))
    assert InstanceRecord.from_json(rec.to_json()) == rec
    assert rec.validate() is rec


def test_a_bad_record_is_refused_when_written() -> None:
    bad = InstanceRecord("gateway", "g1", "tcp://127.0.0.1:1", "h", 1, listeners={"stratum": f"{INJECTION}:4000"})
    with pytest.raises(ConfigError, match="address must be host:port"):
        bad.validate()
    with pytest.raises(ConfigError, match="host"):
        InstanceRecord("gateway", "g1", f"tcp://{INJECTION}:4000", "h", 1).validate()
    with pytest.raises(ConfigError, match="bytes"):
        InstanceRecord("s", "i", "tcp://h:1", "h", 1, methods=tuple(f"m{n:0>150}" for n in range(600))).validate()
