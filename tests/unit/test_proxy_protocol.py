"""PROXY protocol v1/v2: golden bytes from the spec and from HAProxy itself, bounds, and garbage."""

from __future__ import annotations

import random
import struct

import pytest

from meshkit.gateway.proxy_protocol import (
    V1_MAX,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Family,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

# Bytes HAProxy 2.6 sent to a server (send-proxy / send-proxy-v2), each followed by the client's b"hello".
HAPROXY = {
    # send-proxy-v2, client over TCP/IPv4 127.0.0.1:49737 -> 127.0.0.1:51933
    "v2_tcp4": "0d0a0d0a000d0a515549540a2111000c7f0000017f000001c249cadd",
    # send-proxy-v2, client over TCP/IPv6 [::1]:58889 -> [::1]:35503
    "v2_tcp6": "0d0a0d0a000d0a515549540a21210024" + "00" * 15 + "01" + "00" * 15 + "01" + "e6098aaf",
    # send-proxy-v2 proxy-v2-options unique-id,authority,crc32c: TLVs 0x03 (CRC32C) and 0x05 (empty unique id)
    "v2_tcp4_tlv": "0d0a0d0a000d0a515549540a211100167f0000017f000001be71aea1030004ffe3754b050000",
    # send-proxy-v2 for a client on a UNIX socket: LOCAL, family UNSPEC, no addresses
    "v2_local": "0d0a0d0a000d0a515549540a20000000",
    # the same with the TLV options: LOCAL with a non-zero len (a receiver must skip it)
    "v2_local_tlv": "0d0a0d0a000d0a515549540a2000000a030004826374b8050000",
    # send-proxy, TCP/IPv4 and TCP/IPv6, and a UNIX-socket client (UNKNOWN)
    "v1_tcp4": b"PROXY TCP4 127.0.0.1 127.0.0.1 37387 36897\r\n".hex(),
    "v1_tcp6": b"PROXY TCP6 ::1 ::1 44057 53261\r\n".hex(),
    "v1_unknown": b"PROXY UNKNOWN\r\n".hex(),
}

EXPECTED = {
    "v2_tcp4": ProxyHeader(2, False, Family.INET, ("127.0.0.1", 49737), ("127.0.0.1", 51933), 28),
    "v2_tcp6": ProxyHeader(2, False, Family.INET6, ("::1", 58889), ("::1", 35503), 52),
    "v2_tcp4_tlv": ProxyHeader(2, False, Family.INET, ("127.0.0.1", 48753), ("127.0.0.1", 44705), 38,
                               tlvs=((0x03, bytes.fromhex("ffe3754b")), (0x05, b""))),
    "v2_local": ProxyHeader(2, True, Family.UNSPEC, None, None, 16),
    "v2_local_tlv": ProxyHeader(2, True, Family.UNSPEC, None, None, 26,
                                tlvs=((0x03, bytes.fromhex("826374b8")), (0x05, b""))),
    "v1_tcp4": ProxyHeader(1, False, Family.INET, ("127.0.0.1", 37387), ("127.0.0.1", 36897), 44),
    "v1_tcp6": ProxyHeader(1, False, Family.INET6, ("::1", 44057), ("::1", 53261), 32),
    "v1_unknown": ProxyHeader(1, True, Family.UNSPEC, None, None, 15),
}


@pytest.mark.parametrize("name", sorted(HAPROXY))
def test_haproxy_golden_bytes(name: str) -> None:
    raw = bytes.fromhex(HAPROXY[name])
    header = parse(raw + b"hello")
    assert header == EXPECTED[name]
    assert header is not None and header.length == len(raw)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("name", ["v2_tcp4_tlv", "v2_local_tlv"])
def test_the_captured_crc32c_tlvs_check_out(name: str) -> None:
    # The spec's PP2_TYPE_CRC32C: the whole header with the checksum zeroed. Proves the vectors are HAProxy's.
    raw = bytearray(bytes.fromhex(HAPROXY[name]))
    at = raw.index(bytes.fromhex("030004")) + 3
    stated = bytes(raw[at : at + 4])
    raw[at : at + 4] = b"\0\0\0\0"
    assert crc32c(bytes(raw)).to_bytes(4, "big") == stated


def test_the_spec_v1_examples() -> None:
    example = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    assert parse(example) == ProxyHeader(1, False, Family.INET, ("192.168.0.1", 56324), ("192.168.0.11", 443), 47)
    longest4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(longest4) == 56 and parse(longest4) is not None
    f6 = ":".join(["ffff"] * 8)
    longest6 = f"PROXY TCP6 {f6} {f6} 65535 65535\r\n".encode()
    assert len(longest6) == 104
    assert parse(longest6) == ProxyHeader(1, False, Family.INET6, (f6, 65535), (f6, 65535), 104)
    worst = f"PROXY UNKNOWN {f6} {f6} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX == 107
    assert parse(worst) == ProxyHeader(1, True, Family.UNSPEC, None, None, 107)
    with pytest.raises(ProxyHeaderError, match="no CRLF within 107 bytes"):
        parse(f"PROXY UNKNOWN {f6} {f6} 65535 655350\r\n".encode())


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(block) if length is None else length) + block


def test_v2_built_from_the_spec_layout() -> None:
    udp4 = v2(0x21, 0x12, bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 5353, 53))
    assert parse(udp4) == ProxyHeader(2, False, Family.INET, ("10.0.0.1", 5353), ("10.0.0.2", 53), 28, stream=False)
    paths = b"/run/client.sock".ljust(108, b"\0") + b"/run/gw.sock".ljust(108, b"\0")
    unix = v2(0x21, 0x31, paths)
    assert parse(unix) == ProxyHeader(2, False, Family.UNIX, "/run/client.sock", "/run/gw.sock", 232)
    odd = v2(0x21, 0x32, b"\xff\xfe".ljust(108, b"\0") + b"\0" * 108)
    header = parse(odd)
    assert header is not None and header.source == "\\xff\\xfe" and header.destination == "" and not header.stream
    unspec = v2(0x21, 0x00, b"\x04\x00\x01x")  # PROXY with UNSPEC: no addresses, then a NOOP TLV
    assert parse(unspec) == ProxyHeader(2, False, Family.UNSPEC, None, None, 20, tlvs=((4, b"x"),))
    # LOCAL ignores the family and skips len bytes, whatever they are.
    local = v2(0x20, 0x11, b"\x01" * 40)
    assert parse(local) == ProxyHeader(2, True, Family.UNSPEC, None, None, 56)


def test_every_prefix_of_a_header_asks_for_more() -> None:
    for raw in [bytes.fromhex(h) for h in HAPROXY.values()]:
        for cut in range(len(raw)):
            assert parse(raw[:cut]) is None, (raw, cut)
        assert parse(bytearray(raw)) is not None and parse(memoryview(raw)) is not None


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"PROXI", "not a PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX", "not a PROXY protocol header"),
        (V2_SIGNATURE + b"\x10", "version/command byte 0x10"),
        (V2_SIGNATURE + b"\x22", "version/command byte 0x22"),
        (V2_SIGNATURE + b"\x21\x41", "family/transport byte 0x41 is unassigned"),
        (V2_SIGNATURE + b"\x21\x13", "family/transport byte 0x13 is unassigned"),
        (v2(0x21, 0x10, b"\0" * 12), "0x10 is not a valid pair"),
        (v2(0x21, 0x11, b"\0" * 11), "shorter than the 12-byte address block"),
        (v2(0x21, 0x21, b"\0" * 35), "shorter than the 36-byte address block"),
        (v2(0x21, 0x31, b"\0" * 215), "shorter than the 216-byte address block"),
        (v2(0x21, 0x11, b"\0" * 12 + b"\x01\x00"), "TLV is cut short"),
        (v2(0x21, 0x11, b"\0" * 12 + b"\x01\x00\x05abc"), "TLV 0x01 of 5 bytes overruns"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "65535 bytes is over the 1024-byte limit"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone CR or LF"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "lone CR or LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "malformed"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "address 01.2.3.4 is not inet"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "is not inet"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "is not inet"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is not inet6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "is not inet6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port 01"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port 65536"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port -1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", r"port \+1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xc3\xa9\r\n", "not US-ASCII"),
        (b"PROXY TCP4 " + b"1" * 200, "no CRLF within 107 bytes"),
    ],
)
def test_invalid_headers_are_refused_clearly(raw: bytes, words: str) -> None:
    with pytest.raises(ProxyHeaderError, match=words) as caught:
        parse(raw)
    assert len(str(caught.value)) < 200


def test_errors_come_as_soon_as_the_bad_byte_is_seen() -> None:
    for raw in (b"X", b"PX", b"\r\n\r\n\x01", V2_SIGNATURE + b"\x31"):
        with pytest.raises(ProxyHeaderError):
            parse(raw)
    # A v2 length over the cap is judged on the 16 fixed bytes, without waiting for the rest.
    with pytest.raises(ProxyHeaderError, match="over the 1024-byte limit"):
        parse(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_LENGTH + 1))


def test_the_v2_cap_is_configurable_and_bounds_what_is_read() -> None:
    big_tlv = b"\x04" + struct.pack("!H", 1500) + b"\0" * 1500
    raw = v2(0x21, 0x11, b"\0" * 12 + big_tlv)
    with pytest.raises(ProxyHeaderError, match="over the 1024-byte limit"):
        parse(raw)
    header = parse(raw + b"x" * 100_000, max_v2_length=2048)
    assert header is not None and header.length == 16 + 12 + 1503 and header.tlvs == ((4, b"\0" * 1500),)
    assert parse(raw[:-1], max_v2_length=2048) is None


def test_random_garbage_never_escapes_as_another_exception() -> None:
    rng = random.Random(1305998791)
    valid = [bytes.fromhex(h) for h in HAPROXY.values()]
    outcomes = {"need more": 0, "header": 0, "refused": 0}
    for i in range(4000):
        if i % 2:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
            if i % 4 == 1:  # garbage behind a valid start, so the deeper checks are reached
                raw = rng.choice([V2_SIGNATURE + bytes([0x21, rng.choice([0x11, 0x21, 0x31, 0x12])]), b"PROXY "]) + raw
        else:  # one valid header with a few bytes changed, cut somewhere
            changed = bytearray(rng.choice(valid) + b"hello")
            for _ in range(rng.randrange(1, 4)):
                changed[rng.randrange(len(changed))] = rng.getrandbits(8)
            raw = bytes(changed[: rng.randrange(len(changed) + 1)])
        try:
            header = parse(raw)
        except ProxyHeaderError as exc:
            outcomes["refused"] += 1
            assert len(str(exc)) < 200
            continue
        if header is None:
            outcomes["need more"] += 1
            assert len(raw) < 16 + V2_MAX_LENGTH
        else:
            outcomes["header"] += 1
            assert 0 < header.length <= len(raw)
    assert all(count > 50 for count in outcomes.values()), outcomes
