"""The registry field grammar (meshkit.names), and its table in docs/protocol.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshkit import names, record

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
SECTION = DOC[DOC.index("### Registry field grammar"):DOC.index("### The changes channel")]

INJECTION = "fe80::1%x;shutdown frontend stratum "


def test_the_doc_carries_every_pattern_and_bound() -> None:
    for pattern in (names.SERVICE_NAME, names.INSTANCE_ID, names.LISTENER_NAME):
        assert f"`{pattern.pattern}`" in SECTION
    assert names.SCOPE_ID.pattern in SECTION
    assert record.TOKEN.pattern.replace("{1,200}", "") in SECTION
    for bound in (record.MAX_RECORD_BYTES, record.MAX_ITEMS, record.MAX_LISTENERS, record.MAX_PID,
                  names.MAX_HOST):
        assert str(bound) in SECTION, bound


@pytest.mark.parametrize(
    "host",
    ["node-7", "a", "gw-1.example.com", "x" * 63, ".".join(["a" * 63] * 3) + ".abc", "10.0.0.1", "::1",
     "fe80::1%eth0", "fe80::1%vlan.10_a-b", "2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"],
)
def test_valid_hosts(host: str) -> None:
    assert names.validate_host(host) == host


@pytest.mark.parametrize(
    "host",
    [INJECTION, "fe80::1%", "fe80::1%a b", "fe80::1%a\nb", "10.0.0.1%eth0", "-a", "a-", "a..b", "", "a b",
     "a_b", "x" * 64, "a" * 254, "node\n", "nöde", "a;b", "a#b", None, 5, "[::1]"],
    ids=repr,
)
def test_invalid_hosts(host: Any) -> None:
    with pytest.raises(ValueError, match="host must be"):
        names.validate_host(host)


def test_ip_literals() -> None:
    assert names.is_ip_literal("10.0.0.1") and names.is_ip_literal("fe80::1%eth0")
    assert not names.is_ip_literal(INJECTION) and not names.is_ip_literal("node-7")
    assert not names.is_ip_literal("10.0.0.1%eth0")  # scope ids are for IPv6 only


@pytest.mark.parametrize(
    ("address", "parts"),
    [("10.0.0.1:4000", ("10.0.0.1", 4000)), ("[::1]:4000", ("::1", 4000)), ("::1:4000", ("::1", 4000)),
     ("gw.local:1", ("gw.local", 1)), ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535))],
)
def test_split_address(address: str, parts: tuple[str, int]) -> None:
    assert names.split_address(address) == parts
    assert names.validate_endpoint(f"tcp://{address}") == f"tcp://{address}"


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", ":4000", "h:0", "h:70000", "h:port", "h:+1", "h: 1", "h:1\n", "[gw.local]:1", "[10.0.0.1]:1",
     f"{INJECTION}:1", f"[{INJECTION}]:1", "a:b:1", "h:000001", None],
    ids=repr,
)
def test_invalid_addresses(address: Any) -> None:
    with pytest.raises(ValueError, match="address must be host:port"):
        names.split_address(address)


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/x", "tcp://", "tcp://h", "TCP://h:1", "tcp://h:1/x", None])
def test_invalid_endpoints(endpoint: Any) -> None:
    with pytest.raises(ValueError, match="endpoint must be"):
        names.validate_endpoint(endpoint)


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (names.validate_service_name, ["echo", "a", "x_y-9", "s" * 64], ["", "Echo", "a:b", "a*", "a.b", "s" * 65]),
        (names.validate_instance_id, ["3f2a9c1b7d4e", "a.b_c-D"], ["", "a:b", "a?", "a[1]", "a b", "i" * 65]),
        (names.validate_listener_name, ["stratum", "http-2"], ["", "a.b", "a:b", "*", "l" * 65]),
    ],
)
def test_names(check: Any, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert check(value) == value
    for value in bad:
        with pytest.raises(ValueError, match="must be"):
            check(value)


def test_errors_clip_the_value() -> None:
    with pytest.raises(ValueError) as caught:
        names.validate_host("x;" * 100_000)
    assert len(str(caught.value)) < 300
