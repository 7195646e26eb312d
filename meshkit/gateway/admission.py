"""What a new client connection passes before it is served: its PROXY header, bans, limits.

* The PROXY v1/v2 header HAProxy puts in front of a connection
  (``send-proxy-v2``) is read by :class:`~meshkit.gateway.proxy_front.ProxyFront`,
  bounded in bytes (the parser never needs more than :data:`MAX_HEADER`) and
  in time (``proxy_timeout``). With ``proxy_protocol = "require"`` a
  connection without a valid header is reset and counted as
  ``proxy_header``; with ``"accept"`` a connection whose first bytes cannot
  begin a header (or that sends nothing within ``proxy_timeout``, or leaves
  without a byte) has none, and an invalid header is refused as with
  ``require``; with ``"off"`` nothing is read. Client bytes read past the
  header are handed on, to be served as if just received.
  :func:`client_of` names the client from the header.
* :class:`Guard` decides from memory (no I/O) whether an address may
  connect (bans, :class:`~meshkit.gateway.limits.AddressLimits`), judges
  each request for the ban policy, and holds the bans in force. Addresses in
  ``limit_exempt`` are never limited nor banned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import jsonrpc
from .bans import Ban, BanList, BanPolicy, normalize_address
from .limits import AddressLimits, Exemptions, TokenBucket
from .options import GatewayOptions
from .proxy_protocol import V1_MAX, V2_MAX_LENGTH, ProxyHeader

#: The most bytes a header may take (a v2 header with ``V2_MAX_LENGTH`` bytes of addresses and TLVs).
MAX_HEADER = max(V1_MAX, 16 + V2_MAX_LENGTH)


def client_of(header: ProxyHeader | None, peer: Any) -> tuple[str, str | None]:
    """``(peer text, address)`` of the client: ``"ip:port"`` and the IP that limits key on.

    From the header when it names an INET/INET6 source, else from the
    socket's peer. The address is None for a connection that is the proxy's
    own (a v2 LOCAL: HAProxy's health check), which no limit applies to.
    """
    if header is not None and header.local:
        return _peer_text(peer), None
    source = header.source if header is not None else peer
    if isinstance(source, tuple) and len(source) >= 2:
        host, port = str(source[0]), source[1]
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            return text, normalize_address(host)
        except ValueError:
            return text, host
    return _peer_text(peer), None  # a unix socket: nothing to key on


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


Refusal = tuple[int, str, dict[str, Any]]


class Guard:
    """Bans, per-address limits and the ban policy of one gateway (see the module doc)."""

    def __init__(self, options: GatewayOptions, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.options = options
        self.exempt = Exemptions(options.limit_exempt)
        self.limits = AddressLimits(options.max_per_address, options.connect_rate,
                                    options.connect_burst, options.max_addresses)
        self.policy = BanPolicy(options.ban_ratio, options.ban_min_requests, options.max_addresses)
        self.bans = BanList(options.max_addresses)
        self._clock = clock
        self._wall = wall

    def limited(self, address: str | None) -> bool:
        """Whether limits and bans apply to ``address`` at all."""
        return address is not None and address not in self.exempt

    def admit(self, address: str | None) -> Refusal | None:
        """Count a new connection from ``address``, or the error to close it with (then not counted)."""
        if not self.limited(address):
            return None
        assert address is not None
        ban = self.bans.get(address, self._wall())
        if ban is not None:
            return banned_error(ban)
        reason = self.limits.admit(address, self._clock())
        if reason is None:
            return None
        return (jsonrpc.ADDRESS_LIMITED,
                f"too many connections from {address} ({reason}); retry later", {"reason": reason})

    def release(self, address: str | None) -> None:
        """A connection :meth:`admit` let in has closed."""
        if self.limited(address):
            assert address is not None
            self.limits.release(address)

    def request_bucket(self, address: str | None) -> TokenBucket | None:
        """The request-rate bucket for a new connection from ``address`` (None: not limited)."""
        if not self.limited(address) or self.options.request_rate <= 0:
            return None
        return TokenBucket(self.options.request_rate, self.options.request_burst, self._clock())

    def judge(self, address: str | None, kind: str) -> bool:
        """Count one request of ``kind`` (``ok``, ``invalid``, ``client``); True: ban ``address`` now."""
        if self.options.ban_time <= 0 or not self.limited(address):
            return False
        assert address is not None
        bad = kind in self.options.ban_on
        if kind != "ok" and not bad:
            return False  # a kind the policy does not look at
        return self.policy.record(address, bad)

    def ban_here(self, address: str, reason: str) -> Ban:
        """Ban ``address`` in this gateway's memory now (the caller shares it through Redis)."""
        ban = Ban(address, self._wall() + self.options.ban_time, reason)
        self.bans.add(ban)
        self.policy.forget(address)
        return ban


def banned_error(ban: Ban) -> Refusal:
    """The error a banned address is closed with."""
    return (jsonrpc.BANNED, f"address {ban.address} is banned: {ban.reason or 'no reason given'}",
            {"until": round(ban.until, 3)})
