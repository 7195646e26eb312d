"""The PROXY protocol (v1 and v2) as HAProxy sends it to a server: the client's real addresses.

HAProxy's ``send-proxy`` (v1) or ``send-proxy-v2`` (v2) puts one header in
front of the first byte of a connection it opens to a gateway, saying which
client the connection carries. :func:`parse` reads it from the start of a
receive buffer, incrementally: it returns ``None`` while more bytes are
needed, a :class:`ProxyHeader` once the header is complete (``length``
bytes of the buffer; the client's own bytes follow), and raises
:class:`ProxyHeaderError` as soon as the bytes seen cannot begin a valid
header. It never reads past :data:`V1_MAX` bytes (v1) or ``16 +
max_v2_length`` (v2), whatever the buffer holds. Spec: HAProxy's
``doc/proxy-protocol.txt``; what follows is the part a receiver needs.

Version 1 (text)
    One US-ASCII line, at most 107 bytes with its CRLF::

        PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\\r\\n
        PROXY TCP6 <src ip> <dst ip> <src port> <dst port>\\r\\n
        PROXY UNKNOWN[ anything]\\r\\n

    Exactly one space between fields. IPv4 addresses are four decimal
    numbers 0..255 without leading zeros; IPv6 addresses are as
    ``inet_pton`` reads them (no zone index); ports are decimal 0..65535
    without leading zeros. A lone CR or LF is an error. ``UNKNOWN`` means
    "use the connection's own addresses" and is returned like a v2 LOCAL.

Version 2 (binary)
    A 16-byte fixed part, then ``len`` bytes::

        offset  size  field
        0       12    signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
        12      1     version (high nibble, must be 2) | command (low nibble:
                      0 LOCAL, 1 PROXY; anything else is an error)
        13      1     family (high nibble: 0 UNSPEC, 1 INET, 2 INET6,
                      3 UNIX) | transport (low nibble: 0 UNSPEC, 1 STREAM,
                      2 DGRAM); other nibble values are errors
        14      2     len: bytes after the fixed part, big-endian
        16      len   address block, then TLVs

    The address block, for PROXY (all integers big-endian)::

        0x11 TCP/IPv4, 0x12 UDP/IPv4   src 4, dst 4, src port 2, dst port 2   (12 bytes)
        0x21 TCP/IPv6, 0x22 UDP/IPv6   src 16, dst 16, src port 2, dst port 2 (36 bytes)
        0x31 UNIX stream, 0x32 dgram   src 108, dst 108: NUL-padded paths      (216 bytes)
        0x00 UNSPEC                    none: use the connection's own addresses

    Any other family/transport pair with PROXY is an error, and so is a
    ``len`` shorter than the pair's address block. For LOCAL (HAProxy's
    health checks, and connections from a UNIX-socket client) the addresses
    are ignored whatever the family says, and ``len`` bytes are still
    skipped; they are read as TLVs only when the family byte is 0x00, as
    HAProxy sends it.

    After the addresses come TLVs up to ``len``: type (1 byte), length
    (2 bytes, big-endian), value. They are checked to tile the rest of the
    header exactly (one that overruns it is an error) and returned raw;
    none is interpreted here (not even ``PP2_TYPE_CRC32C``, 0x03).

    A ``len`` above ``max_v2_length`` (default :data:`V2_MAX_LENGTH`) is
    refused as soon as the 16 fixed bytes are in, so that a peer cannot
    make the receiver buffer 64 KiB before it is judged.

The receiver must only speak this on a port that only trusted proxies can
reach (the header is believed, not checked); the gateway enables it per
listener.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass

from ..errors import MeshError
from ..untrusted import clip

__all__ = ["V1_MAX", "V2_MAX_LENGTH", "V2_SIGNATURE", "Family", "ProxyHeader", "ProxyHeaderError", "parse"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest valid v1 line, CRLF included ("PROXY UNKNOWN" + two full IPv6 addresses + ports)
V2_MAX_LENGTH = 1024  # default cap on v2's len: addresses (216 at most) plus room for HAProxy's TLVs
_V2_FIXED = 16
_UNIX_PATH = 108


class ProxyHeaderError(MeshError):
    """The peer's first bytes are not a valid PROXY protocol header (the connection must be dropped)."""


class Family(enum.Enum):
    """Where the proxied connection's addresses come from."""

    UNSPEC = "unspec"  # not given: use the connection's own endpoints (v2 LOCAL/UNSPEC, v1 UNKNOWN)
    INET = "inet"
    INET6 = "inet6"
    UNIX = "unix"


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header.

    ``local`` is true for a v2 LOCAL command or a v1 ``UNKNOWN``: the
    connection is the proxy's own, and its real endpoints are to be used.
    ``source``/``destination`` are ``(ip, port)`` for INET/INET6, a path for
    UNIX, ``None`` when not given. ``length`` is how many buffer bytes the
    header took. ``stream`` is false only for a datagram (v2 DGRAM).
    """

    version: int
    local: bool
    family: Family
    source: tuple[str, int] | str | None
    destination: tuple[str, int] | str | None
    length: int
    stream: bool = True
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(buffer: bytes | bytearray | memoryview, *, max_v2_length: int = V2_MAX_LENGTH) -> ProxyHeader | None:
    """The header at the start of ``buffer``; ``None`` if more bytes are needed.

    Raises :class:`ProxyHeaderError` as soon as the bytes already seen rule
    a valid header out (wrong signature, bad field, over the size limits).
    """
    data = bytes(buffer[: max(V1_MAX, _V2_FIXED + max_v2_length)])
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, max_v2_length)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyHeaderError(f"not a PROXY protocol header: starts with {clip(data[:16], 60)}")


# -- version 1 --------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:V1_MAX]
    if not head.startswith(V1_PREFIX[: len(head)]):
        raise ProxyHeaderError(f"not a PROXY protocol header: starts with {clip(head[:16], 60)}")
    end = head.find(b"\r\n")
    stray = next((i for i, b in enumerate(head[: end if end >= 0 else len(head)]) if b in b"\r\n"), -1)
    if stray >= 0 and not (head[stray] == 0x0D and stray == len(head) - 1):  # a CR may wait for its LF
        raise ProxyHeaderError("PROXY v1 line has a lone CR or LF")
    if end < 0:
        if len(head) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line has no CRLF within {V1_MAX} bytes")
        return None
    try:
        line = head[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not US-ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, True, Family.UNSPEC, None, None, end + 2)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 line is malformed: {clip(line, 110)}")
    family = Family.INET if fields[1] == "TCP4" else Family.INET6
    src, dst = _v1_address(fields[2], family), _v1_address(fields[3], family)
    sport, dport = _v1_port(fields[4]), _v1_port(fields[5])
    return ProxyHeader(1, False, family, (src, sport), (dst, dport), end + 2)


def _v1_address(text: str, family: Family) -> str:
    try:
        if family is Family.INET:
            # ipaddress refuses leading zeros, as the spec does.
            return str(ipaddress.IPv4Address(text))
        # inet_pton: what HAProxy itself accepts; refuses zone indexes ("fe80::1%eth0").
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (ValueError, OSError):
        raise ProxyHeaderError(f"PROXY v1 address {clip(text, 45)} is not {family.value}") from None


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {clip(text, 10)} is not a decimal number 0..65535")
    return int(text)


# -- version 2 --------------------------------------------------------------------------

# (family, transport) byte of a PROXY command -> (family, address block size, stream?)
_V2_PAIRS: dict[int, tuple[Family, int, bool]] = {
    0x00: (Family.UNSPEC, 0, True),
    0x11: (Family.INET, 12, True),
    0x12: (Family.INET, 12, False),
    0x21: (Family.INET6, 36, True),
    0x22: (Family.INET6, 36, False),
    0x31: (Family.UNIX, 2 * _UNIX_PATH, True),
    0x32: (Family.UNIX, 2 * _UNIX_PATH, False),
}


def _parse_v2(data: bytes, max_v2_length: int) -> ProxyHeader | None:
    seen = min(len(data), len(V2_SIGNATURE))
    if data[:seen] != V2_SIGNATURE[:seen]:
        raise ProxyHeaderError(f"not a PROXY protocol header: starts with {clip(data[:16], 60)}")
    if len(data) > 12 and (data[12] >> 4 != 2 or data[12] & 0x0F > 1):
        raise ProxyHeaderError(f"PROXY v2 version/command byte {data[12]:#04x} is not 0x20 or 0x21")
    if len(data) > 13 and (data[13] >> 4 > 3 or data[13] & 0x0F > 2):
        raise ProxyHeaderError(f"PROXY v2 family/transport byte {data[13]:#04x} is unassigned")
    if len(data) < _V2_FIXED:
        return None
    local = data[12] & 0x0F == 0
    pair = data[13]
    (size,) = struct.unpack_from("!H", data, 14)
    if size > max_v2_length:
        raise ProxyHeaderError(f"PROXY v2 header of {size} bytes is over the {max_v2_length}-byte limit")
    if local:
        family, address_size, stream = Family.UNSPEC, 0, True
    elif pair in _V2_PAIRS:
        family, address_size, stream = _V2_PAIRS[pair]
    else:
        raise ProxyHeaderError(f"PROXY v2 family/transport {pair:#04x} is not a valid pair")
    if size < address_size:
        raise ProxyHeaderError(f"PROXY v2 len {size} is shorter than the {address_size}-byte address block")
    if len(data) < _V2_FIXED + size:
        return None
    block = data[_V2_FIXED : _V2_FIXED + size]
    source, destination = _v2_addresses(family, block) if not local else (None, None)
    tlvs = _tlvs(block[address_size:]) if not local or pair == 0x00 else ()
    return ProxyHeader(2, local, family, source, destination, _V2_FIXED + size, stream, tlvs)


def _v2_addresses(family: Family, block: bytes) -> tuple[tuple[str, int] | str | None, tuple[str, int] | str | None]:
    if family is Family.INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport)
    if family is Family.INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
        return (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport)
    if family is Family.UNIX:
        return _unix_path(block[:_UNIX_PATH]), _unix_path(block[_UNIX_PATH : 2 * _UNIX_PATH])
    return None, None


def _unix_path(raw: bytes) -> str:
    # NUL-padded; any bytes are a valid path, so decoding never fails.
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError("PROXY v2 TLV is cut short by the header's length")
        kind, size = data[offset], int.from_bytes(data[offset + 1 : offset + 3], "big")
        if offset + 3 + size > len(data):
            raise ProxyHeaderError(f"PROXY v2 TLV {kind:#04x} of {size} bytes overruns the header")
        found.append((kind, data[offset + 3 : offset + 3 + size]))
        offset += 3 + size
    return tuple(found)
