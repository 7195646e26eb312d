"""Statsd datagrams: the address they go to, the lines packed into them, the socket that sends them.

Sending never blocks and never raises: :class:`UdpSender`'s socket is
non-blocking and connected, and every datagram it could not send is counted
in :attr:`UdpSender.dropped`.
"""

from __future__ import annotations

import socket

from .errors import ConfigError

__all__ = ["UdpSender", "pack", "parse_address"]


def parse_address(address: str) -> tuple[str, int, bool]:
    """``host:port`` or ``[v6addr]:port`` as (host, port, ipv6)."""
    host, sep, port_text = address.rpartition(":")
    ipv6 = host.startswith("[") and host.endswith("]")
    if ipv6:
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"statsd_address must be host:port, got {address!r}")
    return host, int(port_text), ipv6


class UdpSender:
    """A non-blocking, connected UDP socket that counts the datagrams it could not send."""

    def __init__(self, host: str, port: int, ipv6: bool) -> None:
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        addr = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0][4]
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self.dropped = 0
        try:
            # Non-blocking: a full buffer must cost a lost metric, not a stalled handler.
            # Connected: the kernel skips a route lookup per send, and reports a
            # refused port instead of dropping silently, so losses can be counted.
            self._sock.setblocking(False)
            self._sock.connect(addr)
        except OSError:
            self._sock.close()
            raise

    def send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except (OSError, ValueError, AttributeError):
            # AttributeError: a send racing close() from another thread finds no socket.
            self.dropped += 1

    def close(self) -> None:
        self._sock.close()


def pack(lines: list[str], size: int) -> list[bytes]:
    """``lines`` joined by newlines into datagrams of at most ``size`` bytes.

    A single line longer than ``size`` goes alone in its own datagram rather
    than being cut (a cut line would be a wrong figure, not a missing one).
    """
    datagrams: list[bytes] = []
    current: list[bytes] = []
    length = 0
    for line in lines:
        data = line.encode("ascii")
        if current and length + 1 + len(data) > size:
            datagrams.append(b"\n".join(current))
            current, length = [], 0
        length += len(data) + (1 if current else 0)
        current.append(data)
    if current:
        datagrams.append(b"\n".join(current))
    return datagrams
